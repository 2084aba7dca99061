"""The MQTT plumbing every component shares: how to reach the broker (TLS, login, backoff), the
CONNECT properties, and the ids and actions of the board agent's protocol that both sides read.

The agent (blockskip.edge.agent), the camera (blockskip.edge.capture), the host worker
(blockskip.host.serve) and the operator CLI (blockskip.host.fleet) connect through `make_client`;
topics live under `blockskip/<device_id>/` (`device_prefix`). Protocol: edge/AGENT.md.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from blockskip.errors import ConfigError

# Ids that become part of a topic (device ids, command ids, transfer ids): no wildcards, no separators.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# The agent's actions that run as a job: their end comes as a `progress` event, their images on `result`.
JOB_ACTIONS = ("train", "generate", "dataset")


def device_prefix(device_id: str) -> str:
    """The topic prefix of a board: `blockskip/<device_id>/`."""
    return f"blockskip/{device_id}/"


@dataclass
class BrokerConfig:
    """How to reach the broker (shared with `blockskip capture`)."""

    host: str = "localhost"  # broker host name or address
    port: int = 8883  # 8883 for TLS, 1883 for plain TCP
    keepalive: int = 30  # seconds; the will fires after ~1.5x this without traffic
    ca_file: str | None = None  # CA certificate (PEM): enables TLS
    cert_file: str | None = None  # optional client certificate (PEM)
    key_file: str | None = None  # its private key (PEM)
    username: str | None = None  # the agent's: its device id (client id and ACL prefix are the login)
    password_file: str | None = None  # file holding the password (first line)
    password_env: str | None = None  # or: the environment variable holding it
    reconnect_min_s: float = 1.0  # first reconnect delay; doubled per failure ...
    reconnect_max_s: float = 60.0  # ... up to this cap

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker.port must be 1-65535, got {self.port}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("broker.reconnect_min_s must be > 0 and <= broker.reconnect_max_s")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("broker.cert_file and broker.key_file go together")

    def password(self) -> str | None:
        """The password from its file or environment variable (never logged)."""
        if self.password_file:
            try:
                return Path(self.password_file).read_text().splitlines()[0]
            except (OSError, IndexError) as err:
                raise ConfigError(f"broker.password_file {self.password_file} cannot be read") from err
        if self.password_env:
            if self.password_env not in os.environ:
                raise ConfigError(f"broker.password_env: ${self.password_env} is not set")
            return os.environ[self.password_env]
        return None


def make_client(broker: BrokerConfig, client_id: str, manual_ack: bool = False) -> mqtt.Client:
    """A paho v2 MQTT v5 client with TLS, credentials and capped exponential reconnect backoff."""
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    if broker.ca_file:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=broker.ca_file)
        if broker.cert_file:
            context.load_cert_chain(broker.cert_file, broker.key_file)
        client.tls_set_context(context)
    if broker.username:
        client.username_pw_set(broker.username, broker.password())
    client.reconnect_delay_set(broker.reconnect_min_s, broker.reconnect_max_s)
    return client


def check_receive_maximum(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ConfigError(f"receive_maximum must be an integer in 1..65535, got {value!r}")


def connect_properties(session_expiry_s: int, receive_maximum: int | None = None) -> Properties:
    """CONNECT properties: how long the broker keeps the session, and (Receive Maximum) how many
    unacknowledged QoS 1 messages it may send at once, which is also the most it redelivers after
    a broker or client restart."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


def login_for(field: str, identity: Any, broker: "BrokerConfig | dict") -> "BrokerConfig":
    """The broker settings of a component whose id is `identity` (config key `field`: device_id,
    worker_id, client_id): the id must be a valid topic level, and a login, when set, must be that
    id, since the broker makes the login the client id (and a device's ACL prefix)."""
    if not isinstance(identity, str) or not ID_PATTERN.match(identity):
        raise ConfigError(f"{field} must be 1-64 characters of [A-Za-z0-9_.:-]")
    if isinstance(broker, dict):
        broker = BrokerConfig(**broker)
    if broker.username is not None and broker.username != identity:
        raise ConfigError(f"broker.username {broker.username!r} must equal {field} {identity!r}: the broker makes "
                          f"the login the client id (and a device may use only blockskip/<login>/...)")
    return broker
