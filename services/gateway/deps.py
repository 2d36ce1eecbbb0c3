"""FastAPI dependencies as `Annotated` aliases.

All are `async def`: FastAPI runs a plain `def` dependency in a thread pool, a thread hop per
request for what is an attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.blobs import BlobStore
from services.gateway.broker import BrokerLink
from services.gateway.files import Files
from services.gateway.settings import GatewaySettings
from services.gateway.tracking import Tracking


async def _broker(request: Request) -> BrokerLink:
    broker: BrokerLink = request.app.state.broker
    return broker


async def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


Broker = Annotated[BrokerLink, Depends(_broker)]
Settings = Annotated[GatewaySettings, Depends(_settings)]


async def _tracking(request: Request) -> Tracking:
    tracking: Tracking = request.app.state.tracking
    return tracking


TrackingDep = Annotated[Tracking, Depends(_tracking)]


async def _files(request: Request) -> Files:
    files: Files = request.app.state.files
    return files


async def _blobs(request: Request) -> BlobStore:
    blobs: BlobStore = request.app.state.blobs
    return blobs


FilesDep = Annotated[Files, Depends(_files)]
BlobsDep = Annotated[BlobStore, Depends(_blobs)]
