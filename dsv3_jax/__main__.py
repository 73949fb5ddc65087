import sys

from dsv3_jax.cli import main

sys.exit(main())
