"""`python -m hf_fam.cli`: the `hf-fam` command line."""

import sys

from hf_fam.cli import main

sys.exit(main())
