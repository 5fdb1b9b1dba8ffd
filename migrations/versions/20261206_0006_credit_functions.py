"""Credit functions: each credit mutation as one server-side function, so that
an RPC is one statement (and, in autocommit, one transaction) instead of a
dozen round trips.

Each function claims the request_id (when there is one), takes the account's
row lock, checks the rule, moves the balance row and appends the ledger
entries (`credit_post`, the only writer of either), writes the audit entry and
stores the answer, all in the caller's one transaction. Refusals are raised
with SQLSTATEs of class OC (implementation-defined), which
server/credits/repository.py translates into the service's errors:

    OC001  insufficient credits            DETAIL: the credits available
    OC002  settle exceeds the reservation  DETAIL: the credits reserved
    OC003  reservation not pending         DETAIL: its status (EXPIRED when lapsed)
    OC004  reservation not found
    OC005  request_id reused with another payload
    OC006  a grant would overflow the account's 64-bit total

The stored answer of a credit request_id (idempotency_keys.response for the
methods GrantCredits, ReserveCredits and SettleReservation) becomes the
answered row as UTF-8 JSON, which the functions read back on a retry; the
upgrade converts answers stored before it as protobuf, the downgrade converts
them back.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from google.protobuf import timestamp_pb2
from observatory.v1 import credit_pb2

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Accounts at `p_at`: the balance row's sums, the grants valid then and the
# pending holds already past their expire_time (`lapsed`, which no longer
# count). STABLE SQL, so the planner inlines it into the query that calls it.
BALANCES = """
CREATE FUNCTION credit_balances(p_user_ids uuid[], p_at timestamptz)
RETURNS TABLE (user_id uuid, granted bigint, reserved bigint, settled bigint,
               allocated bigint, lapsed bigint, as_of timestamptz)
LANGUAGE sql STABLE AS $fn$
  SELECT a.user_id, a.granted, a.reserved, a.settled,
         (SELECT coalesce(sum(l.amount), 0)::bigint
            FROM credit_allocations l
           WHERE l.user_id = a.user_id AND l.valid_from <= p_at
             AND (l.valid_until IS NULL OR l.valid_until > p_at)),
         (SELECT coalesce(sum(r.amount), 0)::bigint
            FROM credit_reservations r
           WHERE r.user_id = a.user_id AND r.status = 'PENDING' AND r.expire_time <= p_at),
         p_at
    FROM credit_accounts a
   WHERE a.user_id = ANY (p_user_ids)
$fn$
"""

# AIP-155: takes the request_id for this transaction and returns NULL, or
# returns the answer stored by the transaction that took it first (a
# concurrent claim waits for that transaction to end). No request_id: NULL.
CLAIM = """
CREATE FUNCTION credit_claim(p_owner uuid, p_request_id uuid, p_method text,
                             p_request_hash bytea)
RETURNS jsonb LANGUAGE plpgsql AS $fn$
DECLARE
  v_key idempotency_keys;
BEGIN
  IF p_request_id IS NULL THEN
    RETURN NULL;
  END IF;
  INSERT INTO idempotency_keys (owner_id, request_id, method, request_hash)
  VALUES (p_owner, p_request_id, p_method, p_request_hash)
  ON CONFLICT DO NOTHING;
  IF FOUND THEN
    RETURN NULL;
  END IF;
  SELECT * INTO v_key FROM idempotency_keys k
   WHERE k.owner_id = p_owner AND k.request_id = p_request_id;
  IF v_key.method IS DISTINCT FROM p_method
     OR v_key.request_hash IS DISTINCT FROM p_request_hash
     OR v_key.response IS NULL THEN
    RAISE EXCEPTION 'request_id % was already used with a different payload', p_request_id
      USING ERRCODE = 'OC005';
  END IF;
  RETURN convert_from(v_key.response, 'UTF8')::jsonb;
END
$fn$
"""

KEEP_ANSWER = """
CREATE FUNCTION credit_keep_answer(p_owner uuid, p_request_id uuid, p_answer jsonb)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
  IF p_request_id IS NOT NULL THEN
    UPDATE idempotency_keys k SET response = convert_to(p_answer::text, 'UTF8')
     WHERE k.owner_id = p_owner AND k.request_id = p_request_id;
  END IF;
END
$fn$
"""

# The only writer of ledger entries and balance rows: appends the entries
# (parallel arrays), numbered on from the account's last one, and moves the
# balance row's sums, together. Run under the account's row lock.
POST = """
CREATE FUNCTION credit_post(p_user uuid, p_kinds text[], p_amounts bigint[],
                            p_reservation_ids uuid[], p_allocation_ids uuid[],
                            p_references text[], p_granted bigint, p_reserved bigint,
                            p_settled bigint)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
  v_first bigint;
BEGIN
  UPDATE credit_accounts a
     SET granted = a.granted + p_granted, reserved = a.reserved + p_reserved,
         settled = a.settled + p_settled, last_seq = a.last_seq + cardinality(p_kinds),
         update_time = now()
   WHERE a.user_id = p_user
  RETURNING a.last_seq - cardinality(p_kinds) INTO v_first;
  INSERT INTO credit_entries (user_id, seq, kind, amount, reservation_id, allocation_id, reference)
  SELECT p_user, v_first + e.n, e.kind, e.amount, e.reservation_id, e.allocation_id, e.reference
    FROM unnest(p_kinds, p_amounts, p_reservation_ids, p_allocation_ids, p_references)
         WITH ORDINALITY AS e (kind, amount, reservation_id, allocation_id, reference, n);
END
$fn$
"""

GRANT = """
CREATE FUNCTION credit_grant(p_caller uuid, p_request_id uuid, p_request_hash bytea,
                             p_audit_request_id text, p_user uuid, p_amount bigint,
                             p_memo text, p_valid_from timestamptz, p_valid_until timestamptz)
RETURNS credit_allocations LANGUAGE plpgsql AS $fn$
DECLARE
  v_answer jsonb;
  v_granted bigint;
  v_row credit_allocations;
BEGIN
  v_answer := credit_claim(p_caller, p_request_id, 'GrantCredits', p_request_hash);
  IF v_answer IS NOT NULL THEN
    RETURN jsonb_populate_record(NULL::credit_allocations, v_answer);
  END IF;
  INSERT INTO credit_accounts (user_id) VALUES (p_user) ON CONFLICT DO NOTHING;
  SELECT a.granted INTO v_granted FROM credit_accounts a WHERE a.user_id = p_user FOR UPDATE;
  IF v_granted > 9223372036854775807 - p_amount THEN
    RAISE EXCEPTION 'the grant would overflow the account''s 64-bit total'
      USING ERRCODE = 'OC006';
  END IF;
  INSERT INTO credit_allocations (user_id, amount, memo, valid_from, valid_until)
  VALUES (p_user, p_amount, p_memo, p_valid_from, p_valid_until)
  RETURNING * INTO v_row;
  PERFORM credit_post(p_user, ARRAY['GRANT'], ARRAY[p_amount], ARRAY[NULL::uuid],
                      ARRAY[v_row.id], ARRAY[p_memo], p_amount, 0, 0);
  INSERT INTO audit_log (user_id, action, resource, detail, request_id)
  VALUES (p_caller, 'credits.grant', 'allocations/' || v_row.id,
          jsonb_build_object('user_id', p_user, 'amount', p_amount), p_audit_request_id);
  PERFORM credit_keep_answer(p_caller, p_request_id, to_jsonb(v_row));
  RETURN v_row;
END
$fn$
"""

# The balance is read after the lock is granted (a statement of its own, so
# its snapshot sees every change committed before), at the clock of that
# moment: a hold that lapsed while this call waited no longer counts.
RESERVE = """
CREATE FUNCTION credit_reserve(p_caller uuid, p_request_id uuid, p_request_hash bytea,
                               p_audit_request_id text, p_user uuid, p_amount bigint,
                               p_reference text, p_ttl interval)
RETURNS credit_reservations LANGUAGE plpgsql AS $fn$
DECLARE
  v_answer jsonb;
  v_now timestamptz;
  v_available bigint;
  v_row credit_reservations;
BEGIN
  v_answer := credit_claim(p_caller, p_request_id, 'ReserveCredits', p_request_hash);
  IF v_answer IS NOT NULL THEN
    RETURN jsonb_populate_record(NULL::credit_reservations, v_answer);
  END IF;
  PERFORM 1 FROM credit_accounts a WHERE a.user_id = p_user FOR UPDATE;
  v_now := clock_timestamp();
  SELECT greatest(0, b.allocated - (b.reserved - b.lapsed) - b.settled) INTO v_available
    FROM credit_balances(ARRAY[p_user], v_now) b;
  v_available := coalesce(v_available, 0);
  IF v_available < p_amount THEN
    RAISE EXCEPTION '% credits asked for, % available', p_amount, v_available
      USING ERRCODE = 'OC001', DETAIL = v_available::text;
  END IF;
  INSERT INTO credit_reservations (user_id, amount, reference, expire_time)
  VALUES (p_user, p_amount, p_reference, now() + p_ttl)
  RETURNING * INTO v_row;
  PERFORM credit_post(p_user, ARRAY['RESERVE'], ARRAY[p_amount], ARRAY[v_row.id],
                      ARRAY[NULL::uuid], ARRAY[p_reference], 0, p_amount, 0);
  INSERT INTO audit_log (user_id, action, resource, detail, request_id)
  VALUES (p_caller, 'credits.reserve', 'reservations/' || v_row.id,
          jsonb_build_object('user_id', p_user, 'amount', p_amount), p_audit_request_id);
  PERFORM credit_keep_answer(p_caller, p_request_id, to_jsonb(v_row));
  RETURN v_row;
END
$fn$
"""

# Settles p_spent credits of a pending reservation (the rest returns), or
# releases it whole when p_spent is NULL. p_owner limits it to one user's
# reservations (NULL: anyone's, for admins). It leaves PENDING at most once,
# and not after its expire_time.
RESOLVE = """
CREATE FUNCTION credit_resolve(p_caller uuid, p_request_id uuid, p_request_hash bytea,
                               p_audit_request_id text, p_owner uuid, p_reservation uuid,
                               p_spent bigint)
RETURNS credit_reservations LANGUAGE plpgsql AS $fn$
DECLARE
  v_answer jsonb;
  v_user uuid;
  v_held bigint;
  v_used bigint := coalesce(p_spent, 0);
  v_now timestamptz;
  v_status text;
  v_kinds text[] := '{}';
  v_amounts bigint[] := '{}';
  v_row credit_reservations;
BEGIN
  v_answer := credit_claim(p_caller, p_request_id, 'SettleReservation', p_request_hash);
  IF v_answer IS NOT NULL THEN
    RETURN jsonb_populate_record(NULL::credit_reservations, v_answer);
  END IF;
  SELECT r.user_id, r.amount INTO v_user, v_held
    FROM credit_reservations r JOIN credit_accounts a ON a.user_id = r.user_id
   WHERE r.id = p_reservation AND (p_owner IS NULL OR r.user_id = p_owner)
     FOR UPDATE OF a;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'reservation % not found', p_reservation USING ERRCODE = 'OC004';
  END IF;
  IF v_used > v_held THEN
    RAISE EXCEPTION 'cannot settle % credits of a reservation of %', v_used, v_held
      USING ERRCODE = 'OC002', DETAIL = v_held::text;
  END IF;
  v_now := clock_timestamp();
  UPDATE credit_reservations r
     SET status = CASE WHEN p_spent IS NULL THEN 'RELEASED' ELSE 'SETTLED' END,
         settled_amount = v_used, update_time = now()
   WHERE r.id = p_reservation AND r.status = 'PENDING' AND r.expire_time > v_now
  RETURNING * INTO v_row;
  IF NOT FOUND THEN
    SELECT CASE WHEN r.status = 'PENDING' THEN 'EXPIRED' ELSE r.status END INTO v_status
      FROM credit_reservations r WHERE r.id = p_reservation;
    RAISE EXCEPTION 'reservation % is not pending', p_reservation
      USING ERRCODE = 'OC003', DETAIL = v_status;
  END IF;
  IF p_spent IS NOT NULL THEN
    v_kinds := v_kinds || 'SETTLE'::text;
    v_amounts := v_amounts || v_used;
  END IF;
  IF v_held > v_used THEN
    v_kinds := v_kinds || 'RELEASE'::text;
    v_amounts := v_amounts || (v_held - v_used);
  END IF;
  PERFORM credit_post(v_user, v_kinds, v_amounts,
                      array_fill(p_reservation, ARRAY[cardinality(v_kinds)]),
                      array_fill(NULL::uuid, ARRAY[cardinality(v_kinds)]),
                      array_fill(v_row.reference, ARRAY[cardinality(v_kinds)]),
                      0, -v_held, v_used);
  INSERT INTO audit_log (user_id, action, resource, detail, request_id)
  VALUES (p_caller,
          CASE WHEN p_spent IS NULL THEN 'credits.release' ELSE 'credits.settle' END,
          'reservations/' || p_reservation,
          jsonb_build_object('user_id', v_user, 'amount', v_used), p_audit_request_id);
  PERFORM credit_keep_answer(p_caller, p_request_id, to_jsonb(v_row));
  RETURN v_row;
END
$fn$
"""

# The sweeper: one at a time (a transaction-scoped advisory lock; another
# sweeper finds it taken and sweeps nothing), up to p_limit accounts with
# lapsed holds, locked in user_id order. Each lapsed hold becomes EXPIRED with
# an EXPIRE entry and an audit entry naming p_actor. Returns how many
# accounts it locked (fewer than p_limit: nothing is left) and holds it expired.
EXPIRE = """
CREATE FUNCTION credit_expire_lapsed(p_limit integer, p_actor uuid)
RETURNS TABLE (swept_accounts integer, expired_holds integer)
LANGUAGE plpgsql AS $fn$
DECLARE
  v_users uuid[];
  v_user uuid;
  v_ids uuid[];
  v_amounts bigint[];
  v_references text[];
BEGIN
  swept_accounts := 0;
  expired_holds := 0;
  IF NOT pg_try_advisory_xact_lock(hashtext('observatory.credit_expiry')) THEN
    RETURN NEXT;
    RETURN;
  END IF;
  SELECT coalesce(array_agg(s.user_id ORDER BY s.user_id), '{}') INTO v_users
    FROM (SELECT a.user_id FROM credit_accounts a
           WHERE a.user_id IN (SELECT r.user_id FROM credit_reservations r
                                WHERE r.status = 'PENDING' AND r.expire_time <= now())
           ORDER BY a.user_id LIMIT p_limit FOR UPDATE) s;
  swept_accounts := cardinality(v_users);
  FOREACH v_user IN ARRAY v_users LOOP
    WITH lapsed AS (
      UPDATE credit_reservations r SET status = 'EXPIRED', update_time = now()
       WHERE r.user_id = v_user AND r.status = 'PENDING' AND r.expire_time <= now()
      RETURNING r.id, r.amount, r.reference
    )
    SELECT array_agg(l.id ORDER BY l.id), array_agg(l.amount ORDER BY l.id),
           array_agg(l.reference ORDER BY l.id)
      INTO v_ids, v_amounts, v_references
      FROM lapsed l;
    CONTINUE WHEN v_ids IS NULL;
    PERFORM credit_post(v_user, array_fill('EXPIRE'::text, ARRAY[cardinality(v_ids)]),
                        v_amounts, v_ids, array_fill(NULL::uuid, ARRAY[cardinality(v_ids)]),
                        v_references, 0,
                        -(SELECT sum(x) FROM unnest(v_amounts) AS x)::bigint, 0);
    INSERT INTO audit_log (user_id, action, resource, detail, request_id)
    SELECT p_actor, 'credits.expire', 'reservations/' || e.id,
           jsonb_build_object('user_id', v_user, 'amount', e.amount), NULL
      FROM unnest(v_ids, v_amounts) AS e (id, amount);
    expired_holds := expired_holds + cardinality(v_ids);
  END LOOP;
  RETURN NEXT;
END
$fn$
"""

FUNCTIONS = {
    "credit_balances(uuid[], timestamptz)": BALANCES,
    "credit_claim(uuid, uuid, text, bytea)": CLAIM,
    "credit_keep_answer(uuid, uuid, jsonb)": KEEP_ANSWER,
    "credit_post(uuid, text[], bigint[], uuid[], uuid[], text[], bigint, bigint, bigint)": POST,
    "credit_grant(uuid, uuid, bytea, text, uuid, bigint, text, timestamptz, timestamptz)": GRANT,
    "credit_reserve(uuid, uuid, bytea, text, uuid, bigint, text, interval)": RESERVE,
    "credit_resolve(uuid, uuid, bytea, text, uuid, uuid, bigint)": RESOLVE,
    "credit_expire_lapsed(integer, uuid)": EXPIRE,
}

# -- stored answers: protobuf (before) <-> the answered row as JSON (after) -----

ALLOCATION_METHODS = ("GrantCredits",)
RESERVATION_METHODS = ("ReserveCredits", "SettleReservation")
_STATUS_PREFIX = "RESERVATION_STATUS_"


def _time(ts: timestamp_pb2.Timestamp) -> str:
    return ts.ToDatetime(tzinfo=UTC).isoformat()


def _stamp(target: timestamp_pb2.Timestamp, value: str) -> None:
    target.FromDatetime(datetime.fromisoformat(value))


def _allocation_json(stored: bytes) -> dict[str, Any]:
    message = credit_pb2.Allocation.FromString(stored)
    return {
        "id": message.id,
        "user_id": message.user_id,
        "amount": message.amount,
        "memo": message.memo,
        "valid_from": _time(message.valid_from),
        "valid_until": _time(message.valid_until) if message.HasField("valid_until") else None,
        "create_time": _time(message.create_time),
    }


def _reservation_json(stored: bytes) -> dict[str, Any]:
    message = credit_pb2.Reservation.FromString(stored)
    return {
        "id": message.id,
        "user_id": message.user_id,
        "amount": message.amount,
        "settled_amount": message.settled_amount,
        "status": credit_pb2.ReservationStatus.Name(message.status).removeprefix(_STATUS_PREFIX),
        "reference": message.reference,
        "expire_time": _time(message.expire_time),
        "create_time": _time(message.create_time),
        "update_time": _time(message.update_time),
    }


def _allocation_proto(answer: dict[str, Any]) -> bytes:
    message = credit_pb2.Allocation(
        id=answer["id"], user_id=answer["user_id"], amount=answer["amount"], memo=answer["memo"]
    )
    _stamp(message.valid_from, answer["valid_from"])
    if answer["valid_until"] is not None:
        _stamp(message.valid_until, answer["valid_until"])
    _stamp(message.create_time, answer["create_time"])
    return message.SerializeToString()


def _reservation_proto(answer: dict[str, Any]) -> bytes:
    message = credit_pb2.Reservation(
        id=answer["id"],
        user_id=answer["user_id"],
        amount=answer["amount"],
        settled_amount=answer["settled_amount"],
        status=credit_pb2.ReservationStatus.Value(_STATUS_PREFIX + answer["status"]),
        reference=answer["reference"],
    )
    _stamp(message.expire_time, answer["expire_time"])
    _stamp(message.create_time, answer["create_time"])
    _stamp(message.update_time, answer["update_time"])
    return message.SerializeToString()


def _rewrite_answers(methods: Sequence[str], rewrite: Callable[[bytes], bytes]) -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT owner_id, request_id, response FROM idempotency_keys "
            "WHERE method = ANY(:methods) AND response IS NOT NULL"
        ),
        {"methods": list(methods)},
    ).all()
    for owner_id, request_id, response in rows:
        bind.execute(
            sa.text(
                "UPDATE idempotency_keys SET response = :response "
                "WHERE owner_id = :owner_id AND request_id = :request_id"
            ),
            {"response": rewrite(response), "owner_id": owner_id, "request_id": request_id},
        )


def _to_json(convert: Callable[[bytes], dict[str, Any]]) -> Callable[[bytes], bytes]:
    return lambda stored: json.dumps(convert(stored)).encode()


def _to_proto(convert: Callable[[dict[str, Any]], bytes]) -> Callable[[bytes], bytes]:
    return lambda stored: convert(json.loads(stored))


def upgrade() -> None:
    for definition in FUNCTIONS.values():
        op.execute(definition)
    _rewrite_answers(ALLOCATION_METHODS, _to_json(_allocation_json))
    _rewrite_answers(RESERVATION_METHODS, _to_json(_reservation_json))


def downgrade() -> None:
    _rewrite_answers(ALLOCATION_METHODS, _to_proto(_allocation_proto))
    _rewrite_answers(RESERVATION_METHODS, _to_proto(_reservation_proto))
    for signature in reversed(FUNCTIONS):
        op.execute(f"DROP FUNCTION {signature}")
