"""The OpenAI door's views: one base URL for every OpenAI client, each
request routed by its ``model`` (models.py decides which consumer) and run
as a GPU job of that consumer (web.forward). Errors on these paths have
OpenAI's shape (web.error_response)."""

from __future__ import annotations

from flask import Response, jsonify, request

from ..errors import BadRequest, BrokerError
from ..models import OPENAI_ROUTES, model_of
from . import bp, broker, forward, spooled_body


def openai_door(route: str) -> Response:
    b = broker()
    body = spooled_body(None, route)
    query = request.environ.get("QUERY_STRING")
    try:
        if query and not query.isascii():
            raise BadRequest("the query string must be ASCII (percent-encode other bytes)")
        model = model_of(body, request.content_type or "")
        name = b.models.consumer_for(model)
        b.check_consumer(name)
    except BrokerError as e:
        if body is not None:
            body.close()
        if e.status < 500:
            b.client_error(e, None, route)
        raise
    target = f"{b.config.consumers[name].openai_base}/{route}" + (f"?{query}" if query else "")
    return forward(name, route, target, body, gpu=True)


for _route in OPENAI_ROUTES:
    bp.add_url_rule(f"/v1/{_route}", f"openai_{_route.replace('/', '_')}",
                    lambda _route=_route: openai_door(_route), methods=["POST"])


@bp.get("/v1/models")
def models():
    """OpenAI's model list: every concrete name each consumer serves."""
    b = broker()
    data = [{"id": model, "object": "model", "created": 0, "owned_by": name,
             "loaded": b.registry.loaded(name)}
            for model, name in b.models.listing()]
    return jsonify({"object": "list", "data": data})


@bp.get("/v1/models/<path:model>")
def model(model: str):
    """One model of the list (the openai SDK's ``models.retrieve``)."""
    b = broker()
    name = b.models.consumer_for(model)
    return jsonify({"id": model, "object": "model", "created": 0, "owned_by": name,
                    "loaded": b.registry.loaded(name)})


