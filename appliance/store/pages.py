"""Keyset pagination of the Files and Batch API's lists (OpenAI's `after` = the last id of the
previous page), ordered by creation time with the id breaking ties.

Keyset rather than offset paging: a page stays right while rows are added or deleted between
requests. An `after` the caller may not see (unknown, or another key's) is a 400, so ids of
other keys' rows cannot be probed. Never imports the runtime or the APIs.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session

from appliance.errors import InvalidInput


def keyset_page(
    session: Session, statement: Select[Any], table: Any, *, key_id: str | None, after: str | None, newest_first: bool,
    what: str,
) -> Select[Any]:
    """`statement` ordered by (created_at, id) and, with `after`, starting past that row. `table`
    is a mapped class with `id`, `key_id` and `created_at`; `what` names it in the error."""
    if after is not None:
        anchor = session.get(table, after)
        if anchor is None or (key_id is not None and anchor.key_id != key_id):
            raise InvalidInput(f"after: {what} {after!r} not found", field="after")
        if newest_first:
            statement = statement.where(
                (table.created_at < anchor.created_at) | ((table.created_at == anchor.created_at) & (table.id < anchor.id))
            )
        else:
            statement = statement.where(
                (table.created_at > anchor.created_at) | ((table.created_at == anchor.created_at) & (table.id > anchor.id))
            )
    order = (table.created_at.desc(), table.id.desc()) if newest_first else (table.created_at, table.id)
    return statement.order_by(*order)
