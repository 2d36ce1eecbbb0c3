"""FastAPI dependencies as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.blobs import BlobStore
from services.gateway.broker import BrokerLink
from services.gateway.files import Files
from services.gateway.settings import GatewaySettings
from services.gateway.tracking import Tracking


def _broker(request: Request) -> BrokerLink:
    broker: BrokerLink = request.app.state.broker
    return broker


def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


Broker = Annotated[BrokerLink, Depends(_broker)]
Settings = Annotated[GatewaySettings, Depends(_settings)]


def _tracking(request: Request) -> Tracking:
    tracking: Tracking = request.app.state.tracking
    return tracking


TrackingDep = Annotated[Tracking, Depends(_tracking)]


def _files(request: Request) -> Files:
    files: Files = request.app.state.files
    return files


def _blobs(request: Request) -> BlobStore:
    blobs: BlobStore = request.app.state.blobs
    return blobs


FilesDep = Annotated[Files, Depends(_files)]
BlobsDep = Annotated[BlobStore, Depends(_blobs)]
