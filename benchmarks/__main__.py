"""``python -m benchmarks <suite> ...``: see ``benchmarks.run``."""

from benchmarks.run import main

raise SystemExit(main())
