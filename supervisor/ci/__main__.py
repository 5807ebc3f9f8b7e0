"""`python -I -m supervisor.ci`: the one-shot supervisor that `agentctl run --embedded` execs
(supervisor/ci/runner.py). Needs root, as the runner does.

Before anything is imported: a signal (the CI job's Ctrl-C or cancel) is only remembered, so
one that arrives while the interpreter starts (agentctl blocks them across its exec) or the
runner's modules load never ends in a KeyboardInterrupt traceback; the runner acts on it as
soon as it can kill through the audited path (the run ends killed, status 80).
pydantic's plugins stay off: finding them scans every installed distribution's entry points
(~2 % of the runner's start), and a root process has no use for code a package registers; the
loader module that would read that setting is replaced by ci/no_plugins.py, which answers the
same without importing importlib.metadata.
The garbage collector is off while the runner's ~380 modules import: every object they make
lives until the process ends, yet ~6 % of the import time went to collections finding nothing
to free. runner.main() then freezes those objects out of the collector and turns it back on.
The models that can wait are built at their first use, not as they are defined
(buildmode.py): a plain run builds its spec's, its profile's and its own records' and never the
configuration's (no file: every default, made without validating) or the API's views.
Code those imports compile from strings (the dataclasses' generated methods, the models' string
annotations) comes from root's cache of it (ci/codecache.py), ~35 ms of the ~150 ms start, and
so does the bytecode of the modules they load (~8 ms: finding and reading ~250 `.pyc` files);
the cache is in place for the imports only.
asyncio loads without ssl (~4 ms), which comes when something imports it (ci/late_tls.py),
and hashlib and hmac load without OpenSSL's hashes (~2-3 ms): CPython's own sha256 and blake2b
give the same digests.
The watchdog's process is started first (watchdog.start_early): its interpreter's start and
imports (~30 ms of CPU) overlap the runner's imports on the other CPU, where they went beside
`runc create` when the core started it; it has its arguments, and is armed, when the core is
assembled, before any agent starts."""

import gc
import os
import signal
import sys

gc.disable()
early_signals: list[int] = []
for _signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(_signum, lambda signum, _frame: early_signals.append(signum))
# agentctl blocked them across its exec: any that came meanwhile are delivered now, to the above.
signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
# hashlib, and hmac through the secrets module pydantic.types imports, with CPython's own
# hashes rather than OpenSSL's (libcrypto loaded, ~2-3 ms): the run hashes its audit rows
# (sha256), a gateway run's links (blake2b), both built in, same digests.
openssl_hashes = "_hashlib" not in sys.modules
if openssl_hashes:
    sys.modules["_hashlib"] = None  # type: ignore[assignment]  # read by imports as absent
from supervisor.ci import DEFAULT_ROOT  # noqa: E402  (after the signals are taken)

codes = None
if os.geteuid() == 0:  # first, so that it serves as many of the imports as it can
    from supervisor.ci import codecache

    codes = codecache.CodeCache(
        os.path.join(DEFAULT_ROOT, codecache.DIRECTORY_NAME, codecache.FILE_NAME))
    codes.install()
    # The watchdog's interpreter starts now, on the other CPU while the runner's modules load,
    # not beside `runc create`; the core gives it its arguments (daemon/watchdog.py).
    from supervisor.daemon import watchdog

    watchdog.start_early()

from supervisor import buildmode  # noqa: E402
from supervisor.ci import no_plugins  # noqa: E402

sys.modules.setdefault(no_plugins.MODULE, no_plugins)
buildmode.DEFER_BUILD = True

from supervisor.ci import late_tls  # noqa: E402

late_tls.import_asyncio()  # without ssl, until something imports it (ci/late_tls.py)
from supervisor.ci.runner import main  # noqa: E402  (after the collector is off)

if openssl_hashes:  # importable again, by whatever asks for it by name
    del sys.modules["_hashlib"]
if codes is not None:
    codes.uninstall()
    codes.save()

main(early_signals)
