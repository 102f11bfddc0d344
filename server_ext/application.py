"""The extension's application: configuration, the embedded deployment, the routes.

Configure it as ``c.Cellblock.*`` (the ``name`` below): ``url``/``token``/``admin_token`` point
at an existing service; ``start_local`` (the default when no ``CELLBLOCK_URL`` is set) starts
one with the server instead. Either way the extension puts the URL and the client token into
the server's environment, which the kernels it starts inherit. The admin token stays with the
extension (the status page makes the admin calls itself): no kernel gets it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jupyter_server.extension.application import ExtensionApp, ExtensionAppJinjaMixin
from traitlets import Bool, Int, Unicode, default

from cellblock.server_ext import handlers
from cellblock.server_ext.deployment import Backend, LocalDeployment

HERE = Path(__file__).parent


class Cellblock(ExtensionAppJinjaMixin, ExtensionApp):
    name = "cellblock"
    extension_url = "/cellblock/"
    load_other_extensions = True
    template_paths = [str(HERE / "templates")]

    start_local = Bool(help="Start a local `cellblock up` with the server.").tag(config=True)
    url = Unicode("", help="The Cellblock service's URL (default: $CELLBLOCK_URL).").tag(
        config=True
    )
    token = Unicode("", help="The service token (default: $CELLBLOCK_TOKEN).").tag(config=True)
    admin_token = Unicode("", help="An admin token, for the status page's workers.").tag(
        config=True
    )
    state_dir = Unicode("", help="State directory of the embedded deployment.").tag(config=True)
    executors = Int(2, help="Executors of the embedded deployment.").tag(config=True)
    builders = Int(1, help="Cache builders of the embedded deployment.").tag(config=True)

    @default("start_local")
    def _start_local_default(self) -> bool:
        return not os.environ.get("CELLBLOCK_URL")

    @default("state_dir")
    def _state_dir_default(self) -> str:
        base = os.environ.get("CELLBLOCK_STATE_DIR") or "~/.local/state/cellblock-jupyter"
        return str(Path(base).expanduser())

    deployment: LocalDeployment | None = None

    def initialize_settings(self) -> None:
        self.settings["cellblock_backend"] = None
        # Out of the environment kernels inherit, whichever way the server was given it.
        inherited = os.environ.pop("CELLBLOCK_ADMIN_TOKEN", None)
        admin = self.admin_token or inherited or None
        if not self.start_local:
            url = self.url or os.environ.get("CELLBLOCK_URL", "")
            token = self.token or os.environ.get("CELLBLOCK_TOKEN", "")
            if url and token:
                self._use(Backend(url.rstrip("/"), token, admin))
            else:
                self.log.warning("Cellblock: no service configured (c.Cellblock.url / token)")
            return
        state = Path(self.state_dir).expanduser()  # ~/… from a config file, too
        self.deployment = LocalDeployment(
            state,
            executors=self.executors,
            builders=self.builders,
            log=state / "up.log",
            admin_token=admin,
        )
        # A kernel started before the deployment is up (JupyterLab restores the open notebooks
        # at once) inherits no CELLBLOCK_URL. Pointed at the deployment's kernel directory, its
        # client reads the url and token files written there once it is up, when its first
        # cell needs them.
        os.environ["CELLBLOCK_STATE_DIR"] = str(self.deployment.kernel_dir)
        assert self.serverapp is not None
        self.serverapp.io_loop.add_callback(self._start_local)

    async def _start_local(self) -> None:
        assert self.deployment is not None
        self.log.info("Cellblock: starting a local deployment in %s", self.deployment.state_dir)
        try:
            self._use(await self.deployment.start())
        except Exception:
            self.log.exception("Cellblock: the local deployment did not start")
        if self.deployment.replaced is not None:
            self.log.warning(
                "Cellblock: stopped a deployment left running in %s (pid %d); this one "
                "replaces it", self.deployment.state_dir, self.deployment.replaced,
            )  # fmt: skip

    def _use(self, backend: Backend) -> None:
        # The web application copied this extension's settings when it loaded; the
        # embedded deployment comes up later, so its backend goes to the live settings.
        self.settings["cellblock_backend"] = backend
        assert self.serverapp is not None
        self.serverapp.web_app.settings["cellblock_backend"] = backend
        # Kernels started from now on inherit the server's environment.
        os.environ["CELLBLOCK_URL"] = backend.url
        os.environ["CELLBLOCK_TOKEN"] = backend.token
        self.log.info("Cellblock: using the service at %s", backend.url)

    def initialize_handlers(self) -> None:
        routes: list[tuple[str, Any]] = [
            (r"/cellblock/?", handlers.StatusPageHandler),
            (r"/cellblock/status.json", handlers.StatusDataHandler),
            (r"/cellblock/api/v1/ws", handlers.ProxyWebSocketHandler),
            (r"/cellblock/api/v1/(.*)", handlers.ProxyHandler),
        ]
        self.handlers.extend(routes)

    async def stop_extension(self) -> None:
        if self.deployment is not None:
            self.log.info("Cellblock: stopping the local deployment")
            await self.deployment.stop()
