"""kserve's ModelServer, bound to a chosen host and fronted by the request guard.

kserve 0.16's ModelServer has no host setting: its REST server hard-codes 0.0.0.0 in the uvicorn
Config it creates inside start(). start() creates that server, then awaits _serve(); there, before
anything listens, OrbitModelServer sets the Config's host and hands uvicorn serve.guard in front
of kserve's app. gRPC is left off by the caller, so the REST port is the only one opened.
"""

from __future__ import annotations

from serve._kserve import ModelServer
from serve.guard import RequestGuard


class OrbitModelServer(ModelServer):
    def __init__(self, host: str, max_body_bytes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.host = host
        self.max_body_bytes = max_body_bytes

    async def _serve(self) -> None:
        rest = self._rest_server
        if self._rest_multiprocess_server is not None:
            rest = self._rest_multiprocess_server._rest_server
        if rest is None:
            raise RuntimeError("kserve created no REST server")
        rest.config.host = self.host
        rest.config.app = RequestGuard(self.max_body_bytes)
        await super()._serve()
