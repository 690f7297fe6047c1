"""gunicorn settings for mgpumanager.

``gunicorn -c gunicorn.conf.py`` (the repository root's file, which imports
this one) or ``gunicorn -c python:mgpumanager.gunicorn_conf`` serves.

The broker's config (``$MGPUMANAGER_CONFIG``, else etc/consumers.yaml) is read
here too, for the address and the thread count; a bad config stops the start
with every problem listed. gunicorn's own ``--bind`` / ``GUNICORN_CMD_ARGS``
still override anything set here.
"""

import os
import shutil
import sys
import tempfile

from mgpumanager.config import ConfigError, config_path, load_config
from mgpumanager.oslock import lock_file_problem

# The master validates the config, at start and on every SIGHUP, and keeps a
# copy of the last one that passed; the worker reads that copy. A reload with
# a broken config (a typo, a file half written) then keeps the old config
# serving, and says why in the log, /v1/status and /healthz, instead of the
# new worker exiting and gunicorn halting the whole broker.
GOOD_CONFIG_ENV = "MGPUMANAGER_GOOD_CONFIG"
RELOAD_ERROR_ENV = "MGPUMANAGER_RELOAD_ERROR"


# Copies a worker forked by an earlier HUP may still be about to read: HUPs
# can come faster than a worker boots (a few KiB each, removed at exit).
_KEPT_COPIES = 64
_copies: list[str] = []


def _keep_good_copy():
    """Validate the config file as the worker will use it (the YAML and the
    lock file it opens) and keep a copy of it; ConfigError if it is bad."""
    path = config_path()
    cfg = load_config(path)
    problem = lock_file_problem(cfg)
    if problem:
        raise ConfigError(path, [f"scheduler.lock_file: {problem}"])
    fd, copy = tempfile.mkstemp(prefix="mgpumanager-config-", suffix=".yaml")
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
        load_config(path, copy=copy)      # the copy is what was validated, or it changed
    except BaseException:
        _unlink(copy)
        raise
    os.environ[GOOD_CONFIG_ENV] = copy
    os.environ.pop(RELOAD_ERROR_ENV, None)
    _copies.append(copy)
    while len(_copies) > _KEPT_COPIES:
        _unlink(_copies.pop(0))


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


try:
    _config = load_config()
    _keep_good_copy()
except ConfigError as _e:
    sys.exit(f"mgpumanager: {_e}")

wsgi_app = "mgpumanager.app:create_app()"

# One worker, always: the GPU lock is a lock inside one process. A second
# worker would hold a second lock and run GPU jobs beside the first, which
# is exactly the over-commit the broker exists to prevent.
workers = 1
# gthread, with whole request heads before a thread is used, a graceful
# close that does not block the event loop, and a stop that answers the
# queue (see mgpumanager/worker.py).
worker_class = "mgpumanager.worker.BrokerWorker"
# Every queued job holds a thread while it waits, so the count follows the
# queue: max_queue waiters + the running job + spare threads for /v1/status,
# /metrics, /healthz and /audio (server.threads in the config overrides).
threads = _config.server.thread_count(_config.scheduler.max_queue)
bind = [_config.server.bind]

# gthread workers heartbeat from their main loop, so a long GPU job does not
# trip this; it only catches a wedged worker.
timeout = 60
# systemd's stop: finish or cut running jobs within this many seconds.
graceful_timeout = 30
keepalive = 5
# The broker logs one line per GPU job and per eviction itself (to the error
# log, so the journal); an access log line for every status poll would bury
# them. Add --access-logfile - to get one.
accesslog = None
errorlog = "-"
loglevel = "info"
if _config.server.log_format == "json":
    # Every line one JSON object, gunicorn's own (master and worker) too:
    # its loggers get the broker's formatter.
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "mgpumanager.logs.JsonFormatter"}},
        "handlers": {
            "error_console": {"class": "logging.StreamHandler", "formatter": "json",
                              "stream": "ext://sys.stderr"},
            "console": {"class": "logging.StreamHandler", "formatter": "json",
                        "stream": "ext://sys.stdout"}},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error_console"],
                               "propagate": False, "qualname": "gunicorn.error"},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"],
                                "propagate": False, "qualname": "gunicorn.access"}},
        "root": {"level": "INFO", "handlers": ["error_console"]},
    }
# gunicorn's control socket sits at one path per user, so a second broker
# (or the test suite) would fight over it; the broker needs none of it.
control_socket_disable = True
# The broker's threads (health probes, GPU sampler) live in the worker.
preload_app = False


def on_starting(server):
    if server.cfg.workers != 1:
        sys.exit(f"mgpumanager: refusing to start with {server.cfg.workers} workers: the GPU "
                 "lock is process-wide, so a second worker would run GPU jobs concurrently "
                 "and over-commit VRAM. Use one worker; raise scheduler.max_queue or "
                 "server.threads for more concurrency.")


def on_reload(server):
    """SIGHUP, in the master, before the new worker starts: validate the
    config; if it is bad, the new worker serves the last good copy."""
    try:
        _keep_good_copy()
        server.log.info("mgpumanager: config %s reloaded", config_path())
    except (ConfigError, OSError) as e:   # OSError: no temporary directory, a full disk
        os.environ[RELOAD_ERROR_ENV] = str(e)
        server.log.error("mgpumanager: the config reload FAILED; still serving the last good "
                         "config. %s", e)


def on_exit(server):
    for copy in _copies:
        _unlink(copy)
