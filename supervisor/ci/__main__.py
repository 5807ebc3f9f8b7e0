"""`python -I -m supervisor.ci`: the one-shot supervisor that `agentctl run --embedded` execs
(supervisor/ci/runner.py). The garbage collector is off while the runner's ~380 modules import:
every object they make lives until the process ends, yet ~6 % of the import time went to
collections finding nothing to free. runner.main() then freezes those objects out of the
collector and turns it back on. Needs root, as the runner does."""

import gc

gc.disable()

from supervisor.ci.runner import main  # noqa: E402  (after the collector is off)

main()
