"""`python -m defender_cli` and the `kubectl-defender` console script."""

from ._app import main

if __name__ == "__main__":
    raise SystemExit(main())
