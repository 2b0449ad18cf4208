"""`python -m finemem ...`: the `finemem` command where its console script is not on PATH.

`make submit` uses it as the `ray job submit` entrypoint: the job runs in the uploaded working
directory with the cluster's python, whose bin/ (and so the `finemem` script) need not be on PATH.
"""

import sys

from finemem.cli import main

sys.exit(main())
