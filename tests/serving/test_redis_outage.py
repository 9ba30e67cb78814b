"""While Redis is unreachable, every route that needs it answers a typed 503 with Retry-After (never a 500),
and routes that do not need it keep working."""

import httpx
from serving_cluster import free_port as closed_port  # bound, then closed: nothing listens

from server.app import create_app
from server.settings import GatewaySettings


async def test_routes_that_need_redis_answer_503_with_retry_after(tmp_path):
    settings = GatewaySettings(redis_url=f"redis://127.0.0.1:{closed_port()}/0", data_dir=tmp_path)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as gw:
            for method, path, body in (("GET", "/v1/fine_tuning/jobs", None),
                                       ("GET", "/v1/fine_tuning/jobs/ftjob-abc", None),
                                       ("POST", "/v1/fine_tuning/jobs/ftjob-abc/cancel", None)):
                r = await gw.request(method, path, json=body)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] in ("redis_unreachable", "no_worker_available")
            r = await gw.get("/ready")
            assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unreachable"
            assert (await gw.get("/health")).status_code == 200
