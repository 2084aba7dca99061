"""Fixtures for the agent tests: an Agent of device dev-a started on the test broker (the broker,
probe, PKI and deployed-broker fixtures are in tests/conftest.py, their harness in tests/mqtt_harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockskip.edge.agent import Agent, AgentConfig, BrokerConfig
from mqtt_harness import wait_until


# ---- the agent under test ------------------------------------------------------------------

def make_config(tmp_path: Path, broker, **kw) -> AgentConfig:
    fields = dict(device_id="dev-a", data_dir=str(tmp_path / "data"), progress_interval_s=0.0,
                  broker=BrokerConfig(host="127.0.0.1", port=broker.port, keepalive=5,
                                      reconnect_min_s=0.1, reconnect_max_s=0.5))
    fields.update(kw)
    return AgentConfig(**fields)


@pytest.fixture
def start_agent(tmp_path: Path, broker):
    """start_agent(jobs=None, **config) -> a started Agent for device dev-a on the test broker."""
    agents: list[Agent] = []

    def start(jobs=None, **kw) -> Agent:
        agent = Agent(make_config(tmp_path, broker, **kw), jobs=jobs)
        (agent.data_dir / "model").mkdir(exist_ok=True)
        agent.start()
        wait_until(agent.connected.is_set)
        agents.append(agent)
        return agent

    yield start
    for a in agents:
        if a.client.is_connected() or a._dispatcher.is_alive():
            a.stop(flush_timeout_s=1)


