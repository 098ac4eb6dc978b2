"""Drop-in for ``curvlinops.KFACLinearOperator``, ``FisherType`` and ``KFACType``.

The operator is :class:`torch_linop.kfac.KFACOperator` behind curvlinops 3's interface
(constructor arguments, ``@`` on tensors and tensor lists, torch ``dtype``, ``to_scipy()``,
``trace``/``det``/``logdet``/``frobenius_norm`` properties, ``state_dict``); its factors follow
curvlinops' conventions, so products agree with curvlinops 3 to rounding. One difference:
cross-entropy targets equal to ``ignore_index`` are left out here (curvlinops counts them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import torch
from torch import nn

from torch_linop.curvlinops._torch_base import PyTorchLinearOperator
from torch_linop.kfac.blocks import KroneckerBlockOperator
from torch_linop.kfac.operator import KFACOperator
from torch_linop.kfac.passes import count_data
from torch_linop.kfac.types import FisherType, KFACType

_LOSSES: dict[str, type[nn.Module]] = {
    "MSELoss": nn.MSELoss,
    "CrossEntropyLoss": nn.CrossEntropyLoss,
    "BCEWithLogitsLoss": nn.BCEWithLogitsLoss,
}
RTOL, ATOL = 5e-5, 1e-6  # curvlinops' tolerances for the determinism check


class PyTorchOperatorFace(PyTorchLinearOperator):
    """curvlinops 3's contract (:class:`PyTorchLinearOperator`: ``@`` on tensors and tensor
    lists, torch ``dtype`` and ``device``, ``adjoint()``, ``to_scipy(dtype)``, algebra) over
    one of our symmetric Kronecker operators, ``_core``."""

    SELF_ADJOINT: bool = True
    _core: Any

    def _init_face(self, shapes: list[torch.Size]) -> None:
        PyTorchLinearOperator.__init__(self, shapes, shapes)

    @property
    def dtype(self) -> torch.dtype:
        return self._core.torch_dtype

    @property
    def device(self) -> torch.device:
        return self._core.device

    def _matmat(self, X: list[torch.Tensor]) -> list[torch.Tensor]:
        columns = X[0].shape[-1]
        flat = torch.cat([x.reshape(-1, columns) for x in X])
        result = self._core._matmat_torch(flat)
        sizes = [int(shape.numel()) for shape in self._out_shape]
        return [
            part.reshape(*shape, columns)
            for part, shape in zip(result.split(sizes), self._out_shape)
        ]


class _CurvlinopsCounts(KFACOperator):
    """Our KFAC with curvlinops' data counts: ``num_data`` and ``num_per_example_loss_terms``
    given or inferred as curvlinops does (every cross-entropy target counts)."""

    num_per_example_loss_terms: int | None = None

    def _counts(self) -> tuple[int, int]:
        if self._num_data is not None and self.num_per_example_loss_terms is not None:
            return self._num_data, self._num_data * self.num_per_example_loss_terms
        num_samples, _ = count_data(self.data, self.loss)
        num_data = self._num_data or num_samples
        if self.num_per_example_loss_terms is not None:
            return num_data, num_data * self.num_per_example_loss_terms
        terms = 0
        for _, targets in self.data:
            family = self.loss.family
            terms += targets.numel() if family == "cross_entropy" else targets.shape[:-1].numel()
        if terms % num_data:
            raise ValueError(
                "The number of loss terms must be divisible by the number of data points; "
                f"num_loss_terms={terms}, N_data={num_data}."
            )
        self.num_per_example_loss_terms = terms // num_data
        return num_data, terms


def _model_call(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(inputs)


def _batch_size_of(batch_size_fn: Callable[[Any], int] | None) -> Callable[[Any], int]:
    def size(inputs: Any) -> int:
        if batch_size_fn is not None:
            return batch_size_fn(inputs)
        if isinstance(inputs, MutableMapping):
            raise ValueError("When using dict-like custom data, `batch_size_fn` is required.")
        return int(inputs.shape[0])

    return size


class KFACLinearOperator(PyTorchOperatorFace):
    """curvlinops 3's ``KFACLinearOperator`` (same arguments and semantics)."""

    _SUPPORTED_LOSSES = tuple(_LOSSES.values())
    _SUPPORTED_FISHER_TYPE: Any = FisherType
    _CORE: type[KFACOperator] = _CurvlinopsCounts

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: nn.Module,
        params: list[torch.Tensor],
        data: Iterable[Any],
        progressbar: bool = False,
        check_deterministic: bool = True,
        seed: int = 2147483647,
        fisher_type: str = FisherType.MC,
        mc_samples: int = 1,
        kfac_approx: str = KFACType.EXPAND,
        num_per_example_loss_terms: int | None = None,
        separate_weight_and_bias: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        if not isinstance(loss_func, self._SUPPORTED_LOSSES):
            raise ValueError(f"Invalid loss: {loss_func}. Supported: {self._SUPPORTED_LOSSES}.")
        if fisher_type not in self._SUPPORTED_FISHER_TYPE:
            raise ValueError(
                f"Invalid fisher_type: {fisher_type}. Supported: {self._SUPPORTED_FISHER_TYPE}."
            )
        if not isinstance(model_func, nn.Module):
            raise TypeError(f"model_func must be an nn.Module, got {type(model_func).__name__}")
        self._model_func = model_func
        self._loss_func = loss_func
        self._params = params
        self._progressbar = progressbar
        core = self._CORE(
            model_func,
            data,
            loss_func,
            params=params,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            seed=seed,
            kfac_approx=kfac_approx,
            separate_weight_and_bias=separate_weight_and_bias,
            num_data=num_data,
            batch_size_fn=_batch_size_of(batch_size_fn),
            forward=_model_call,
            process_group=False,  # curvlinops' KFAC is single-process
        )
        core.num_per_example_loss_terms = num_per_example_loss_terms
        self._core = core
        self._init_face([p.shape for p in params])
        if check_deterministic:
            self._check_deterministic()

    # ------------------------------------------------------------------ curvlinops names
    @property
    def _seed(self) -> int:
        return self._core.seed

    @property
    def _fisher_type(self) -> str:
        return self._core.fisher_type.value

    @property
    def _kfac_approx(self) -> str:
        return self._core.kfac_approx.value

    @property
    def _mc_samples(self) -> int:
        return self._core.mc_samples

    @property
    def _separate_weight_and_bias(self) -> bool:
        return self._core.separate_weight_and_bias

    @property
    def _input_covariances(self) -> dict[str, torch.Tensor]:
        return self._core.input_covariances

    @property
    def _gradient_covariances(self) -> dict[str, torch.Tensor]:
        return self._core.gradient_covariances

    @property
    def _mapping(self) -> dict[str, dict[str, int]]:
        """Layer name -> {"weight": position, "bias": position} (curvlinops' mapping)."""
        mapping: dict[str, dict[str, int]] = {}
        for layer in self._core.layers:
            entry = {}
            if layer.weight_index is not None:
                entry["weight"] = layer.weight_index
            if layer.bias_index is not None:
                entry["bias"] = layer.bias_index
            mapping[layer.name] = entry
        return mapping

    def compute_kronecker_factors(self) -> None:
        """Compute (again) the Kronecker factors in one pass over the data."""
        self._core.compute_factors()

    def _check_deterministic(self) -> None:
        """Two factor computations must agree (fails for dropout, shuffling data...)."""
        self._core.compute_factors()
        first = (dict(self._core.input_covariances), dict(self._core.gradient_covariances))
        self._core.compute_factors()
        for old, new in zip(first, (self._core.input_covariances, self._core.gradient_covariances)):
            for name, value in old.items():
                if not torch.allclose(value, new[name], rtol=RTOL, atol=ATOL):
                    raise RuntimeError(
                        f"Check for deterministic Kronecker factors failed for layer '{name}': "
                        "two passes over the data disagree. Likely causes: dropout or BatchNorm "
                        "in train mode (call model.eval()), shuffled data, random augmentation."
                    )

    # ------------------------------------------------------------------ structure
    @property
    def trace(self) -> torch.Tensor:
        return self._core.trace()

    @property
    def det(self) -> torch.Tensor:
        return self._core.det()

    @property
    def logdet(self) -> torch.Tensor:
        return self._core.logdet()

    @property
    def frobenius_norm(self) -> torch.Tensor:
        return self._core.frobenius_norm()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """curvlinops' keys: model state, loss, settings, factors."""
        core = self._core
        core._prepare()
        return {
            "model_func_state_dict": self._model_func.state_dict(),
            "loss_type": type(self._loss_func).__name__,
            "loss_reduction": self._loss_func.reduction,
            "progressbar": self._progressbar,
            "seed": core.seed,
            "fisher_type": core.fisher_type.value,
            "mc_samples": core.mc_samples,
            "kfac_approx": core.kfac_approx.value,
            "num_per_example_loss_terms": core.num_per_example_loss_terms,
            "separate_weight_and_bias": core.separate_weight_and_bias,
            "num_data": core._num_data,
            "input_covariances": dict(core.input_covariances),
            "gradient_covariances": dict(core.gradient_covariances),
            "trace": None,
            "det": None,
            "logdet": None,
            "frobenius_norm": None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load settings and factors (and, as curvlinops does, the model's parameters)."""
        warnings.warn(
            "Loading a state dict will overwrite the parameters of the model underlying the "
            "linear operator!",
            stacklevel=2,
        )
        self._model_func.load_state_dict(state_dict["model_func_state_dict"])
        loss_type = _LOSSES[state_dict["loss_type"]]
        if not isinstance(self._loss_func, loss_type):
            raise ValueError(f"Loss function mismatch: {loss_type} != {type(self._loss_func)}.")
        if state_dict["loss_reduction"] != self._loss_func.reduction:
            raise ValueError(
                "Loss function reduction mismatch: "
                f"{state_dict['loss_reduction']} != {self._loss_func.reduction}."
            )
        core = self._core
        core.seed = state_dict["seed"]
        core.fisher_type = FisherType(state_dict["fisher_type"])
        core.mc_samples = state_dict["mc_samples"]
        core.kfac_approx = KFACType(state_dict["kfac_approx"])
        core.num_per_example_loss_terms = state_dict["num_per_example_loss_terms"]
        core.separate_weight_and_bias = state_dict["separate_weight_and_bias"]
        core._num_data = state_dict["num_data"]
        names = {layer.name for layer in core.layers}
        for key in ("input_covariances", "gradient_covariances"):
            given = set(state_dict[key])
            if given and given != names and not (key == "input_covariances" and given <= names):
                raise ValueError(
                    "Keys in dictionary do not match mapping keys of linear operator. "
                    f"Difference: {given - names}."
                )
        core.input_covariances = dict(state_dict["input_covariances"])
        core.gradient_covariances = dict(state_dict["gradient_covariances"])

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, Any],
        model_func: nn.Module,
        params: list[torch.Tensor],
        data: Iterable[Any],
        check_deterministic: bool = True,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> KFACLinearOperator:
        """An operator with the state's settings and factors (no pass over the data)."""
        loss_func = _LOSSES[state_dict["loss_type"]](reduction=state_dict["loss_reduction"])
        operator = cls(
            model_func,
            loss_func,
            params,
            data,
            check_deterministic=False,
            progressbar=state_dict["progressbar"],
            seed=state_dict["seed"],
            fisher_type=state_dict["fisher_type"],
            mc_samples=state_dict["mc_samples"],
            kfac_approx=state_dict["kfac_approx"],
            num_per_example_loss_terms=state_dict["num_per_example_loss_terms"],
            separate_weight_and_bias=state_dict["separate_weight_and_bias"],
            num_data=state_dict["num_data"],
            batch_size_fn=batch_size_fn,
        )
        operator.load_state_dict(state_dict)
        if check_deterministic:
            operator._check_deterministic()
        return operator


__all__ = ["FisherType", "KFACLinearOperator", "KFACType", "KroneckerBlockOperator"]
