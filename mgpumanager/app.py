"""``create_app()``: the one place where the parts are wired together.

gunicorn calls it in the worker (``wsgi_app = "mgpumanager.app:create_app()"``),
so the broker's threads start in the process that serves, never in the master.
"""

from __future__ import annotations

from flask import Flask

from . import web
from .broker import Broker
from .config import Config, load_config
from .consumers import ConsumerActions
from .gpu import GpuReader
from .logs import setup_logging
from .metrics import metrics_registry

EXTENSION = "mgpumanager"


def create_app(config: Config | str | None = None, *, reader: GpuReader | None = None,
               actions: ConsumerActions | None = None, start: bool = True) -> Flask:
    cfg = config if isinstance(config, Config) else load_config(config)
    setup_logging(cfg.server.log_format)
    app = Flask(__name__)
    app.json.sort_keys = False
    broker = Broker(cfg, reader=reader, actions=actions)
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
