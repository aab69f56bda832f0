"""`python -m prvr.cli ...` (torchrun: `torchrun ... -m prvr.cli train-worker ...`)."""
import sys

from prvr.cli.app import main

sys.exit(main())
