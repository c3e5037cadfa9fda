"""What a run on a service stack waits for, from the broker's consumer counts."""

from __future__ import annotations

from conveyor.contracts import Topology
from conveyor.service.consumers import missing_consumers

TOPOLOGY = Topology(stack="prod")


def test_nobody_consuming_names_the_controller_and_a_worker_per_pool() -> None:
    missing = missing_consumers("prod", TOPOLOGY, ["gpu", "default", "gpu"], {})
    assert [str(m) for m in missing] == [
        "no controller consumes conveyor.prod.runs; start one with: "
        "conveyor controller start --stack prod",
        "no worker of pool 'default' consumes conveyor.prod.steps.default; start one with: "
        "conveyor worker start --stack prod",
        "no worker of pool 'gpu' consumes conveyor.prod.steps.gpu; start one with: "
        "conveyor worker start --stack prod --pool gpu",
    ]


def test_consumed_queues_are_not_named() -> None:
    counts = {"conveyor.prod.runs": 1, "conveyor.prod.steps.default": 2}
    missing = missing_consumers("prod", TOPOLOGY, ["default", "gpu"], counts)
    assert [m.what for m in missing] == ["worker of pool 'gpu'"]
    counts["conveyor.prod.steps.gpu"] = 1
    assert missing_consumers("prod", TOPOLOGY, ["default", "gpu"], counts) == []
