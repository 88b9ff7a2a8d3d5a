"""An order service using SQLAlchemy: the order row and its event are written in one transaction.

outbox.enqueue_message() is a plain SQL function, so the ORM needs nothing special: call it with
session.execute() in the same session (= the same transaction) as the ORM insert.
"""
from decimal import Decimal

from sqlalchemy import BigInteger, Numeric, String, cast, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orm_orders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2))


def create_order(session: Session, order_id: int, customer: str, total: Decimal) -> int:
    """Adds the order and queues its `orders.created` event; returns the outbox message id.
    Nothing is sent unless the caller commits the session."""
    session.add(Order(id=order_id, customer=customer, total=total))
    event = {"id": order_id, "customer": customer, "total": str(total)}
    return session.execute(
        select(
            func.outbox.enqueue_message(
                "orders.created",
                cast(event, JSONB),
                str(order_id),  # key: the order id keeps one order's events in order
                cast({"source": "orders-service"}, JSONB),
            )
        )
    ).scalar_one()
