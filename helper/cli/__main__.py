"""python -m kgpu_helper.cli: the kgpu command without its installed script."""

import sys

from kgpu_helper.cli.main import main

sys.exit(main())
