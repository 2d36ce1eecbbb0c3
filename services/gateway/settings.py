from __future__ import annotations

from pydantic import Field

from services.messaging.settings import CourierSettings


class GatewaySettings(CourierSettings):
    host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(default=8000, ge=1, le=65_535, description="Port the gateway listens on.")
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    max_batch_events: int = Field(
        default=1_000, ge=1, description="Most events in one batch request (413 beyond)."
    )
    retry_after_seconds: int = Field(
        default=5, ge=1, description="`Retry-After` sent with a 503 when the broker is away."
    )
