"""``KFACOperator``: the Kronecker-factored approximation of the GGN / Fisher as an operator.

Per covered layer the curvature block is ``G kron A`` (gradient factor kron input factor, see
:mod:`torch_linop.kfac.factors`), separately for weight and bias or for the joined ``[W | b]``.
Factors are computed in one hooked pass over the data the first time they are needed (or by
:meth:`KFACOperator.compute_factors`), then reused: structure-exploiting ``trace``, ``det``,
``logdet``, ``frobenius_norm``, factor eigendecompositions and ``inverse`` cost nothing more
than factor-sized linear algebra.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torch_linop import data_parallel
from torch_linop.data import BatchSource, leading_dim_batch_size
from torch_linop.kfac.blocks import KroneckerBlockOperator
from torch_linop.kfac.factors import FactorAccumulator
from torch_linop.kfac.layers import KFACLayer, find_layers
from torch_linop.kfac.passes import (
    DataSpec,
    GradientsVisitor,
    InputsVisitor,
    count_data,
    default_forward,
    hooked_pass,
)
from torch_linop.kfac.reduction import sum_counts, sum_tensors
from torch_linop.kfac.signals import KFACLoss, kfac_loss_of
from torch_linop.kfac.types import FisherType, KFACType, check_choice

ParamsArgument = Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None


def _named_params(model: nn.Module, params: ParamsArgument) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the parameters: all trainable ones by default, or those given (a
    list of the model's parameters or a name -> parameter mapping), in the given order."""
    if params is None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameter to approximate the curvature of")
        return [n for n, _ in named], [p for _, p in named]
    if isinstance(params, Mapping):
        return list(params), list(params.values())
    name_of = {id(p): name for name, p in model.named_parameters()}
    params = list(params)
    missing = [i for i, p in enumerate(params) if id(p) not in name_of]
    if missing:
        raise ValueError(
            f"params[{missing[0]}] is not a parameter of the model; pass the model's own "
            "parameters (e.g. list(model.parameters()))"
        )
    return [name_of[id(p)] for p in params], params


class KFACOperator(KroneckerBlockOperator):
    """KFAC of ``model`` on ``data`` (``(inputs, targets)`` batches) for ``loss``.

    ``loss``: ``nn.MSELoss()``, ``nn.CrossEntropyLoss(ignore_index=...)``,
    ``nn.BCEWithLogitsLoss()``, their functional forms, or ``supervised_loss(...)`` of them;
    ``class_dim=-1`` for cross-entropy on sequence logits ``(batch, seq, C)``.
    ``fisher_type``: ``"type-2"`` (default), ``"mc"`` (``mc_samples`` draws, ``seed``),
    ``"empirical"``, ``"forward-only"``; ``kfac_approx``: ``"expand"`` or ``"reduce"``.
    Parameters of layers other than ``nn.Linear``/``nn.Conv2d`` raise unless
    ``skip_unsupported=True``, which leaves them out of the operator (see ``param_names``).
    Under a process group (default: the initialised default group; ``False``: none) each rank
    passes over its own shard and the factors are summed over ranks once.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss: Any,
        *,
        params: ParamsArgument = None,
        fisher_type: str = FisherType.TYPE2,
        mc_samples: int = 1,
        seed: int = 0,
        kfac_approx: str = KFACType.EXPAND,
        separate_weight_and_bias: bool = True,
        skip_unsupported: bool = False,
        class_dim: int = 1,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        process_group: Any = None,
    ) -> None:
        self.process_group = data_parallel.check_process_group(process_group)
        self.fisher_type = check_choice(fisher_type, FisherType, "fisher_type")
        self.kfac_approx = check_choice(kfac_approx, KFACType, "kfac_approx")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        if self.fisher_type != FisherType.MC and mc_samples != 1:
            raise ValueError(
                f"mc_samples={mc_samples} only applies to fisher_type='mc'; leave it at 1 for "
                f"fisher_type={self.fisher_type.value!r}"
            )
        if num_data is not None and (not isinstance(num_data, int) or num_data < 1):
            raise ValueError(f"num_data must be a positive int or None, got {num_data!r}")
        self.model = model
        self.loss = kfac_loss_of(loss, class_dim)
        self.mc_samples = mc_samples
        self.seed = seed
        names, tensors = _named_params(model, params)
        layers, kept = find_layers(model, tensors, names, skip_unsupported)
        if not layers:
            raise ValueError(
                "no selected parameter lives in an nn.Linear or nn.Conv2d layer: nothing for "
                "KFAC to approximate"
            )
        position = {index: new for new, index in enumerate(kept)}
        layers = [
            KFACLayer(
                layer.name,
                layer.module,
                None if layer.weight_index is None else position[layer.weight_index],
                None if layer.bias_index is None else position[layer.bias_index],
            )
            for layer in layers
        ]
        self.params = [tensors[i] for i in kept]
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"the parameters have several dtypes {dtypes} or devices {devices}; cast and "
                "move the model to one dtype and device first"
            )
        self._init_layout(
            layers,
            [names[i] for i in kept],
            [tensors[i].shape for i in kept],
            separate_weight_and_bias,
            self.params[0].dtype,
            self.params[0].device,
        )
        self.data = DataSpec(
            BatchSource(data),
            forward or default_forward,
            batch_size_fn or leading_dim_batch_size,
            self.device,
        )
        self._num_data = num_data
        self.input_covariances: dict[str, torch.Tensor] = {}
        self.gradient_covariances: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ factors
    @property
    def has_factors(self) -> bool:
        """Whether the Kronecker factors are computed (or loaded)."""
        return bool(self.gradient_covariances)

    def _counts(self) -> tuple[int, int]:
        """(samples, loss rows) over the data (and the ranks); ``num_data`` overrides samples."""
        num_samples, num_rows = count_data(self.data, self.loss)
        num_samples, num_rows = sum_counts(self.process_group, self.device, [num_samples, num_rows])
        if num_rows == 0:
            raise ValueError(
                "the data hold no loss term (every cross-entropy target equals ignore_index)"
            )
        return (self._num_data or num_samples), num_rows

    def _hooked_pass(
        self,
        num_rows: int,
        on_inputs: InputsVisitor | None,
        on_gradients: GradientsVisitor | None,
    ) -> None:
        """One hooked pass over the data with this operator's model, layers, loss and Fisher type
        (the factors' pass and EKFAC's eigenvalue-correction pass)."""
        hooked_pass(
            self.model,
            self.layers,
            self.params,
            self.data,
            self.loss,
            self.fisher_type,
            self.mc_samples,
            self.seed,
            num_rows,
            on_inputs,
            on_gradients,
        )

    def compute_factors(self) -> None:
        """Compute the Kronecker factors in one hooked pass over the data (replacing any)."""
        num_data, num_rows = self._counts()
        accumulator = FactorAccumulator(self.kfac_approx, self.separate_weight_and_bias, num_data)
        self._hooked_pass(num_rows, accumulator.on_inputs, accumulator.on_gradients)
        factors = accumulator.input_covariances, accumulator.gradient_covariances
        sum_tensors(self.process_group, [f[k] for f in factors for k in sorted(f)])
        if self.fisher_type == FisherType.FORWARD_ONLY:
            for layer in self.layers:
                accumulator.gradient_covariances[layer.name] = torch.eye(
                    layer.out_features, dtype=self.torch_dtype, device=self.device
                )
        missing = [
            layer.name
            for layer in self.layers
            if layer.name not in accumulator.gradient_covariances
        ]
        if missing:
            raise ValueError(
                f"layers {missing} took no part in the model's output on the data; select only "
                "the parameters of layers the forward pass uses"
            )
        self.input_covariances = accumulator.input_covariances
        self.gradient_covariances = accumulator.gradient_covariances

    def _prepare(self) -> None:
        if not self.has_factors:
            self.compute_factors()

    def factors(self, layer: KFACLayer) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(A, G)`` of ``layer`` (``A`` is None when only its bias is selected)."""
        self._prepare()
        return self.input_covariances.get(layer.name), self.gradient_covariances[layer.name]

    # ------------------------------------------------------------------ products
    def _weight_product(self, layer: KFACLayer, block: torch.Tensor) -> torch.Tensor:
        input_factor, gradient_factor = self.factors(layer)
        assert input_factor is not None
        return torch.einsum("ij,jlk,lm->imk", gradient_factor, block, input_factor)

    def _bias_product(self, layer: KFACLayer, block: torch.Tensor) -> torch.Tensor:
        return self.factors(layer)[1] @ block

    # ------------------------------------------------------------------ structure
    def _reduce_blocks(
        self,
        weight_term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        bias_term: Callable[[torch.Tensor], torch.Tensor],
        combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        start: float,
    ) -> torch.Tensor:
        total = torch.tensor(start, dtype=self.torch_dtype, device=self.device)
        for layer in self.layers:
            input_factor, gradient_factor = self.factors(layer)
            for kind, _, _ in self.block_shapes(layer):
                if kind == "bias":
                    total = combine(total, bias_term(gradient_factor))
                else:
                    assert input_factor is not None
                    total = combine(total, weight_term(input_factor, gradient_factor))
        return total

    def trace(self) -> torch.Tensor:
        """``tr(K) = sum tr(A) tr(G)`` over blocks (``tr(G)`` for a separate bias)."""
        return self._reduce_blocks(lambda a, g: a.trace() * g.trace(), torch.trace, torch.add, 0.0)

    def logdet(self) -> torch.Tensor:
        """``log det(K) = sum (m log det A + n log det G)`` for ``A`` n x n, ``G`` m x m."""
        return self._reduce_blocks(
            lambda a, g: g.shape[0] * torch.logdet(a) + a.shape[0] * torch.logdet(g),
            torch.logdet,
            torch.add,
            0.0,
        )

    def det(self) -> torch.Tensor:
        """``det(K) = prod det(A)^m det(G)^n`` (overflows easily: prefer :meth:`logdet`)."""
        return self._reduce_blocks(
            lambda a, g: torch.det(a) ** g.shape[0] * torch.det(g) ** a.shape[0],
            torch.det,
            torch.mul,
            1.0,
        )

    def frobenius_norm(self) -> torch.Tensor:
        """``||K||_F = sqrt(sum ||A||_F^2 ||G||_F^2)``."""
        squared = self._reduce_blocks(
            lambda a, g: a.square().sum() * g.square().sum(),
            lambda g: g.square().sum(),
            torch.add,
            0.0,
        )
        return squared.sqrt()

    def eigendecomposition(self) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per layer, ``{"input": (eigenvalues, eigenvectors), "gradient": (...)}`` of the
        factors (``torch.linalg.eigh``; no ``"input"`` entry for a bias-only layer). The
        eigenvalues of a weight block are all products ``lambda_G[i] * lambda_A[j]``."""
        result: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for layer in self.layers:
            input_factor, gradient_factor = self.factors(layer)
            entry = {"gradient": tuple(torch.linalg.eigh(gradient_factor))}
            if input_factor is not None:
                entry["input"] = tuple(torch.linalg.eigh(input_factor))
            result[layer.name] = entry  # type: ignore[assignment]
        return result

    def to_dense(self) -> torch.Tensor:
        """The ``(n, n)`` matrix (small models only: tests and inspection)."""
        eye = torch.eye(self.shape[0], dtype=self.torch_dtype, device=self.device)
        return self._matmat_torch(eye)

    def inverse(
        self,
        damping: float | tuple[float, float] = 0.0,
        *,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = False,
        cache: bool = True,
        retry_double_precision: bool = True,
    ) -> Any:
        """The damped inverse as an operator (see :class:`KFACInverseOperator`)."""
        from torch_linop.kfac.inverse import KFACInverseOperator

        return KFACInverseOperator(
            self,
            damping,
            use_heuristic_damping=use_heuristic_damping,
            min_damping=min_damping,
            use_exact_damping=use_exact_damping,
            cache=cache,
            retry_double_precision=retry_double_precision,
        )

    # ------------------------------------------------------------------ state
    def _config(self) -> dict[str, Any]:
        return {
            "fisher_type": self.fisher_type.value,
            "kfac_approx": self.kfac_approx.value,
            "mc_samples": self.mc_samples,
            "seed": self.seed,
            "separate_weight_and_bias": self.separate_weight_and_bias,
            "loss": {
                "family": self.loss.family,
                "reduction": self.loss.reduction,
                "ignore_index": self.loss.ignore_index,
                "class_dim": self.loss.class_dim,
            },
            "param_names": list(self.param_names),
        }

    def state_dict(self) -> dict[str, Any]:
        """The configuration and the factors (computed first if needed): save it with
        ``torch.save`` and restore with :meth:`load_state_dict` / :meth:`from_state_dict`."""
        self._prepare()
        return {
            **self._config(),
            "input_covariances": {k: v.clone() for k, v in self.input_covariances.items()},
            "gradient_covariances": {k: v.clone() for k, v in self.gradient_covariances.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the factors of ``state``; raises if it was made for another configuration."""
        mine = self._config()
        different = [key for key in mine if key in state and state[key] != mine[key]]
        if different:
            raise ValueError(
                f"state_dict does not match this operator in {different}: "
                + ", ".join(f"{k}={state[k]!r} here {mine[k]!r}" for k in different)
            )
        names = {layer.name for layer in self.layers}
        for key in ("input_covariances", "gradient_covariances"):
            if not set(state[key]) <= names or (
                key == "gradient_covariances" and set(state[key]) != names
            ):
                raise ValueError(
                    f"state_dict {key} holds layers {sorted(state[key])}, the operator covers "
                    f"{sorted(names)}"
                )
        convert = {"dtype": self.torch_dtype, "device": self.device}
        self.input_covariances = {k: v.to(**convert) for k, v in state["input_covariances"].items()}
        self.gradient_covariances = {
            k: v.to(**convert) for k, v in state["gradient_covariances"].items()
        }

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], model: nn.Module, data: Iterable[Any], **kwargs: Any
    ) -> KFACOperator:
        """An operator with ``state``'s configuration and factors, without a pass over data
        (``kwargs``: the constructor's other arguments, e.g. ``batch_size_fn``)."""
        loss_state = state["loss"]
        named = dict(model.named_parameters())
        missing = [name for name in state["param_names"] if name not in named]
        if missing:
            raise ValueError(
                f"the state_dict covers parameters {missing} that the model does not have; load "
                "it into the model it was computed for"
            )
        params = kwargs.pop("params", None) or {name: named[name] for name in state["param_names"]}
        operator = cls(
            model,
            data,
            KFACLoss(
                loss_state["family"],
                loss_state["reduction"],
                loss_state["ignore_index"],
                loss_state["class_dim"],
            ),
            params=params,
            fisher_type=state["fisher_type"],
            kfac_approx=state["kfac_approx"],
            mc_samples=state["mc_samples"],
            seed=state["seed"],
            separate_weight_and_bias=state["separate_weight_and_bias"],
            **kwargs,
        )
        operator.load_state_dict(state)
        return operator
