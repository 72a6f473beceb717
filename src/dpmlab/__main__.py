"""``python -m dpmlab ...`` (and ``torchrun -m dpmlab`` / ``accelerate launch -m dpmlab``): the command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
