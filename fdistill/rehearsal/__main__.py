"""``python -m fdistill.rehearsal NAME --json PATH``: one rehearsal row in this process, written as JSON."""
import sys

from .run import main

sys.exit(main())
