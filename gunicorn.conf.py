# gunicorn settings for mgpumanager: `gunicorn -c gunicorn.conf.py` from the
# repository root serves the broker on the address in etc/consumers.yaml
# (or $MGPUMANAGER_CONFIG). The settings, and why each is what it is, live
# in mgpumanager/gunicorn_conf.py, so that `mgpumanager serve` uses the same
# ones from any directory.
from mgpumanager.gunicorn_conf import *  # noqa: F401,F403
from mgpumanager.gunicorn_conf import on_exit, on_reload, on_starting  # noqa: F401
