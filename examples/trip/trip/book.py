"""Book trips from the command line: ``python -m trip.book Ann LH400 Lisbon 3 2027-05-01``.

It publishes a StartSaga message (persistent, confirmed) with the trip as the saga's input and
prints the saga id; the orchestrator checks the input against ``TripInput`` and starts the saga.
"""

from __future__ import annotations

import asyncio
import os
import sys

from saga.client import SagaClient


async def main(argv: list[str]) -> None:
    traveller, flight, city, nights, check_in = argv
    url = os.environ.get("SAGA_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    async with await SagaClient.connect(
        url, prefix=os.environ.get("SAGA_PREFIX", "saga")
    ) as client:
        trip = {
            "traveller": traveller,
            "flight": flight,
            "city": city,
            "nights": int(nights),
            "check_in": check_in,
        }
        saga_id = await client.start("trip", trip, key=f"{traveller}-{flight}-{check_in}")
    print(saga_id)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
