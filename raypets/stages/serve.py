"""``raypets serve``: the model behind HTTP on Ray Serve, one image per request, requests batched for the model.

One deployment, :class:`Segmenter`, holds the model in :class:`raypets.inference.ModelRunner` (the runner of
``predict`` and ``evaluate``) and answers through a FastAPI ingress:

- ``POST /segment`` with an image's bytes: the class-id mask at the image's original size as a PNG, the pixels
  ``raypets predict --masks`` writes for that file (the same decode, resize, softmax and full-size argmax);
  ``?format=json``: the class fractions, the size and the mask PNG in base64. A body that is not a usable image
  answers 400 with one line saying why.
- ``GET /healthz``: ``{"status": "ok", ...}`` once the replica holds its model.
- ``GET /``: a page where a person drops a photo and sees its mask over it and the class fractions.

Each request decodes its image in a thread of the replica; ``@serve.batch`` then groups the decoded images of
requests that arrive together (up to ``max_batch``) into one forward pass. Replicas autoscale from one up to
``replicas`` on the requests in flight, each on one GPU with ``--gpu``. ``serve_config.yaml`` deploys the same
application on a cluster with ``serve deploy``, through :func:`app`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.resources import files

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve import Application

from raypets import storage
from raypets.checkpoints import checkpoint_classes, load_model, resolve_checkpoint
from raypets.config import DEVICES
from raypets.data.decode import DEFAULT_MAX_PIXELS, DecodeError, any_failure_as_decode_error, decode_to_size
from raypets.errors import UserError
from raypets.inference import ModelRunner, class_fractions, encode_png, full_size_mask
from raypets.model import require_image_size
from raypets.stages.runtime import init_ray, use_gpus

APP_NAME = "raypets"
PAGE = "serve.html"  # package data beside this module
MAX_BODY_MB = 64  # a larger request body is refused, read no further
BATCH_WAIT_S = 0.01  # how long a batch waits for more requests once it has one


@dataclass(frozen=True)
class ServeConfig:
    """Settings of ``raypets serve`` (and of :func:`app`'s ``args`` in ``serve_config.yaml``)."""

    checkpoint: str  # any CKPT form predict takes: a local path or a URI
    port: int = 8000
    host: str = "127.0.0.1"
    replicas: int = 1  # autoscaling's upper bound; it starts and idles at one
    device: str = "auto"
    max_batch: int = 16  # images per forward pass at most
    size: tuple[int, int] = (160, 160)  # network input (height, width), as predict's --size

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", str(storage.absolute(self.checkpoint)))  # replicas run elsewhere
        object.__setattr__(self, "size", tuple(self.size))  # a list from YAML
        checks = [
            (0 < self.port < 65536, f"--port must be 1..65535, got {self.port}"),
            (self.replicas >= 1, f"--replicas must be at least 1, got {self.replicas}"),
            (self.max_batch >= 1, f"--max-batch must be at least 1, got {self.max_batch}"),
            (self.device in DEVICES, f"unknown device {self.device!r}; choose {', '.join(DEVICES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        require_image_size(*self.size, "--size")


class Segmenter:
    """A replica: the checkpoint's model in a :class:`ModelRunner`, answering the routes of this module's doc.

    The FastAPI app is built in the replica (:meth:`__serve_build_asgi_app__`): a FastAPI object made beside the class
    would be pickled by ``serve.ingress``, which recent FastAPI versions refuse. The deployment wraps the class in
    :func:`application`, so that this module keeps the class under its name and Ray pickles it by reference."""

    def __init__(self, settings: dict, use_gpu: bool) -> None:
        cfg = ServeConfig(**settings)
        checkpoint = resolve_checkpoint(storage.parse(cfg.checkpoint))
        model = load_model(checkpoint)
        # Replicas of one node share its cores as torch threads, as predict's actors do.
        self.runner = ModelRunner(model, checkpoint.normalize, use_gpu, actors=cfg.replicas)
        with torch.inference_mode():
            num_classes = model(torch.zeros(1, 3, 16, 16, device=self.runner.device)).shape[1]
        self.classes = checkpoint_classes(checkpoint, num_classes)
        self.size = cfg.size
        self.info = {"status": "ok", "classes": self.classes, "size": list(cfg.size), "max_batch": cfg.max_batch,
                     "device": self.runner.device.type, "checkpoint": str(checkpoint.uri or checkpoint.weights)}
        self.page = files(__package__).joinpath(PAGE).read_text()
        self.counts = {"forward_passes": 0, "images": 0}  # since the replica started: their ratio is the mean batch
        self.probabilities.set_max_batch_size(cfg.max_batch)

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = FastAPI(title="raypets serve", docs_url=None, redoc_url=None)
        api.get("/healthz")(self.healthz)
        api.get("/", response_class=HTMLResponse)(self.index)
        api.post("/segment")(self.segment)
        return api

    def healthz(self) -> dict:
        return {**self.info, **self.counts}

    def index(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    async def segment(self, request: Request, format: str = "png") -> Response:
        """The mask of the image in the body: PNG, or JSON with ``?format=json``; 400 and one line when unusable."""
        if format not in ("png", "json"):
            return _refuse(f"unknown format {format!r}; choose png or json")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_MB * 2**20:
                return _refuse(f"file too large: over the limit of {MAX_BODY_MB} MB")
        try:
            with any_failure_as_decode_error():
                pixels, decoded = await asyncio.to_thread(decode_to_size, bytes(body), self.size,
                                                          max_pixels=DEFAULT_MAX_PIXELS)
        except DecodeError as err:
            return _refuse(str(err))
        probs = await self.probabilities(pixels)
        mask = await asyncio.to_thread(lambda: full_size_mask(probs, decoded.original_size).cpu().numpy())
        png = encode_png(mask)
        if format == "png":
            return Response(png, media_type="image/png")
        height, width = mask.shape
        return JSONResponse({"width": width, "height": height, "classes": class_fractions(mask, self.classes),
                             "repair": decoded.repair, "mask_png": base64.b64encode(png).decode("ascii")})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=BATCH_WAIT_S)
    async def probabilities(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """The softmax (C, H, W) of each network-size image, in one forward pass for all (in a thread: the replica
        keeps decoding the next requests meanwhile)."""
        probs = await asyncio.to_thread(self.runner.probabilities, np.stack(images))
        self.counts["forward_passes"] += 1
        self.counts["images"] += len(images)
        return list(probs)


def _refuse(reason: str) -> PlainTextResponse:
    return PlainTextResponse(reason.replace("\n", " ") + "\n", status_code=400)


def application(cfg: ServeConfig, use_gpu: bool) -> Application:
    """The Serve application of ``cfg``: :class:`Segmenter` autoscaling from 1 to ``cfg.replicas`` replicas, each
    aiming at a full batch in flight and taking a second one in its queue; one GPU each with ``use_gpu``."""
    autoscaling = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": cfg.replicas,
                   "target_ongoing_requests": cfg.max_batch}
    resources = {"num_cpus": 1, "num_gpus": 1 if use_gpu else 0}
    deployment = serve.deployment(name="Segmenter")(serve.ingress()(Segmenter))
    return deployment.options(autoscaling_config=autoscaling, max_ongoing_requests=2 * cfg.max_batch,
                              ray_actor_options=resources).bind(asdict(cfg), use_gpu)


def app(args: dict) -> Application:
    """The application builder ``serve deploy serve_config.yaml`` calls with the file's ``args`` (the fields of
    :class:`ServeConfig` but host and port, which the file's ``http_options`` set); GPU replicas only with
    ``device: gpu``."""
    cfg = ServeConfig(**args)
    return application(cfg, use_gpu=cfg.device == "gpu")


def serve_until_interrupted(cfg: ServeConfig, *, address: str | None = None,
                            ready: Callable[[dict], None] = print) -> dict:
    """Serve ``cfg`` on local Ray (or the cluster at ``address``) until Ctrl+C (SIGINT) or SIGTERM, then shut Serve
    down; ``ready`` gets the summary once the application answers. Returns that summary."""
    checkpoint = resolve_checkpoint(storage.parse(cfg.checkpoint))
    load_model(checkpoint)  # a wrong checkpoint fails here, before any Ray work
    if not (address or os.environ.get("RAY_ADDRESS")):  # on local Ray, Serve's proxy listens on this machine
        _check_port_free(cfg.host, cfg.port)
    connected = ray.is_initialized()
    init_ray(address)
    use_gpu = use_gpus(cfg.device, 1, "Serve replica")
    summary = {"url": f"http://{cfg.host}:{cfg.port}/", "checkpoint": str(checkpoint.uri or checkpoint.weights),
               "device": "gpu" if use_gpu else "cpu", "replicas": cfg.replicas, "max_batch": cfg.max_batch}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as cleanly as Ctrl+C
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(application(cfg, use_gpu), name=APP_NAME, route_prefix="/")
        ready(summary)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for sig in handlers:  # a second Ctrl+C (or a signal to the whole process group) waits for the shutdown
            signal.signal(sig, signal.SIG_IGN)
        serve.shutdown()
        if not connected:  # Ray this call started or joined (a notebook's own connection stays)
            ray.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return summary


def _check_port_free(host: str, port: int) -> None:
    """One clear error when something already listens at ``host:port`` (Serve's proxy would fail in a log)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot serve at {host}:{port}: {err.strerror}; choose another --port") from None
