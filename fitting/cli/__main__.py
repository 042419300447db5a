"""``python -m fitting.cli``."""
from fitting.cli.main import main

raise SystemExit(main())
