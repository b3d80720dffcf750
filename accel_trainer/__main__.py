"""``python -m accel_trainer ...`` is ``accel-trainer ...``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
