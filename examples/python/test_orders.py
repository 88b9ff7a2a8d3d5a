"""Runs against the cluster and broker of PG_OUTBOX_DSN / PG_OUTBOX_BOOTSTRAP (see `make up`)."""
import json
import os
import time
import uuid
from decimal import Decimal

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from orders import Base, Order, create_order

DSN = os.environ["PG_OUTBOX_DSN"]
BOOTSTRAP = os.environ["PG_OUTBOX_BOOTSTRAP"]


def libpq_to_url(dsn: str) -> str:
    parts = dict(item.split("=", 1) for item in dsn.split())
    return "postgresql+psycopg2://{user}@{host}:{port}/{dbname}".format(**parts)


@pytest.fixture(scope="module")
def engine():
    engine = create_engine(libpq_to_url(DSN))
    Base.metadata.create_all(engine)
    return engine


def events_for(order_id: int, timeout: float = 15.0) -> list:
    """Reads orders.created from the beginning and returns the events of one order."""
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": str(uuid.uuid4()),
                         "enable.auto.commit": False})
    metadata = consumer.list_topics("orders.created", timeout=10)
    partitions = metadata.topics["orders.created"].partitions
    consumer.assign([TopicPartition("orders.created", p, 0) for p in partitions])
    found, deadline, idle_since = [], time.time() + timeout, time.time()
    while time.time() < deadline and time.time() - idle_since < 2.0:
        msg = consumer.poll(0.2)
        if msg is None or msg.error():
            continue
        idle_since = time.time()
        if msg.key() == str(order_id).encode():
            found.append((json.loads(msg.value()), dict(msg.headers() or [])))
    consumer.close()
    return found


def test_a_committed_order_publishes_its_event(engine):
    order_id = int(time.time() * 1000)
    with Session(engine) as session:
        message_id = create_order(session, order_id, "ada", Decimal("99.50"))
        session.commit()
    with engine.connect() as conn:
        assert conn.execute(select(text("outbox.wait_for_delivery(:id, '15 seconds')")),
                            {"id": message_id}).scalar_one()
    events = events_for(order_id)
    assert len(events) == 1
    payload, headers = events[0]
    assert payload == {"id": order_id, "customer": "ada", "total": "99.50"}
    assert headers["source"] == b"orders-service"
    assert headers["pg_outbox_message_id"].endswith(f"-{message_id}".encode())


def test_a_rolled_back_order_leaves_nothing(engine):
    order_id = int(time.time() * 1000) + 1
    with Session(engine) as session:
        message_id = create_order(session, order_id, "bob", Decimal("12.00"))
        session.rollback()
    with Session(engine) as session:
        assert session.get(Order, order_id) is None
        assert session.execute(select(text("outbox.message_status(:id)")), {"id": message_id}).scalar_one() is None
        assert session.execute(text("SELECT count(*) FROM outbox.pending_messages WHERE id = :id"),
                               {"id": message_id}).scalar_one() == 0
    assert events_for(order_id, timeout=4) == []
