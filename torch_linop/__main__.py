"""``python -m torch_linop``: the same as the ``torch-linop`` command."""

from torch_linop.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
