"""The processor's dataset handler: small datasets on the loop, large ones in the process pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from contracts.envelope import derived_event_id
from contracts.events import DatasetProcessed, DatasetSubmitted, DatasetSubmittedData, Scalar
from services.messaging.cpu import CpuPool
from services.processor.handlers import INLINE_VALUES, dataset_submitted
from services.processor.summary import summarise

T = TypeVar("T")


class CountingPool(CpuPool):
    """The real pool, counting what it is given."""

    def __init__(self) -> None:
        super().__init__(workers=1)
        self.runs = 0

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self.runs += 1
        return await super().run(fn, *args, **kwargs)


@pytest.fixture
def pool() -> Iterator[CountingPool]:
    pool = CountingPool()
    yield pool
    pool.close()


def dataset(records: int, fields: int = 5) -> DatasetSubmitted:
    rows: list[dict[str, Scalar]] = [
        {f"f{j}": i * j for j in range(fields)} for i in range(records)
    ]
    return DatasetSubmitted(data=DatasetSubmittedData(name="d", records=rows))


async def test_a_small_dataset_is_summarised_without_the_pool(pool: CountingPool) -> None:
    event = dataset(records=3)
    [processed] = await dataset_submitted(event, pool=pool)
    assert pool.runs == 0
    assert isinstance(processed, DatasetProcessed)
    assert processed.id == derived_event_id(event.id, "dataset.processed")
    assert processed.data.fields == summarise(event.data.records)


async def test_a_large_dataset_is_summarised_in_the_pool(pool: CountingPool) -> None:
    event = dataset(records=INLINE_VALUES // 5 + 1)
    [processed] = await dataset_submitted(event, pool=pool)
    assert pool.runs == 1
    assert isinstance(processed, DatasetProcessed)
    assert processed.data.fields == summarise(event.data.records)
