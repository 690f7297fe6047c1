"""``create_app()``: the one place where the parts are wired together.

gunicorn calls it in the worker (``wsgi_app = "mgpumanager.app:create_app()"``),
so the broker's threads start in the process that serves, never in the master.
"""

from __future__ import annotations

import os

from flask import Flask

from . import web
from .web import leases, openai_door  # noqa: F401 (their views join web.bp)
from .broker import Broker
from .config import Config, load_config
from .consumers import ConsumerActions
from .gpu import GpuReader
from .logs import setup_logging
from .metrics import metrics_registry

EXTENSION = "mgpumanager"
# Set by the master (gunicorn_conf.py); named here so the core needs no gunicorn.
GOOD_CONFIG_ENV = "MGPUMANAGER_GOOD_CONFIG"
RELOAD_ERROR_ENV = "MGPUMANAGER_RELOAD_ERROR"


def create_app(config: Config | str | None = None, *, reader: GpuReader | None = None,
               actions: ConsumerActions | None = None, start: bool = True) -> Flask:
    if isinstance(config, Config):
        cfg = config
    else:
        # Under gunicorn, the copy the master validated (gunicorn_conf.py).
        copy = None if config else os.environ.get(GOOD_CONFIG_ENV)
        if copy and not os.path.exists(copy):
            copy = None           # gone (removed by hand): the file, as without a master
        cfg = load_config(config, copy=copy)
    setup_logging(cfg.server.log_format)
    app = Flask(__name__)
    app.json.sort_keys = False
    broker = Broker(cfg, reader=reader, actions=actions)
    broker.config_error = None if config else os.environ.get(RELOAD_ERROR_ENV)
    if broker.config_error:
        broker.events.add("config_reload_failed", broker.config_error)
    app.extensions[EXTENSION] = broker
    app.extensions[EXTENSION + ".metrics"] = metrics_registry(broker)
    # Paths under /upstream/ are forwarded as sent: no merging of slashes
    # (Werkzeug would answer //x with a redirect), no redirect for a slash.
    app.url_map.merge_slashes = False
    app.url_map.converters["rest"] = web.RestConverter
    app.register_blueprint(web.bp)
    if start:
        broker.start()
    return app
