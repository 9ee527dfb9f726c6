"""Stored responses of `/v1/responses` (`store: true`) and conversations of `/v1/conversations`, in SQLite, so a
conversation continued by `previous_response_id` or `conversation` survives a server restart.

Why SQLite (Python's `sqlite3`): one file, transactions, no server to run, and a write per response is
microseconds; each row holds the response object and the conversation up to it (input items, then output items),
as JSON.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created REAL NOT NULL, response TEXT NOT NULL, items TEXT NOT NULL)"""
# a streamed background response's events (SSE-framed), so its stream can be joined again once it has ended
EVENTS = "CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, events TEXT NOT NULL)"
# each stored response's output items by id, which a later input may name (`item_reference`)
OUTPUTS = ("CREATE TABLE IF NOT EXISTS output_items (id TEXT PRIMARY KEY, response TEXT NOT NULL, "
           "item TEXT NOT NULL)")
# ... and its input items by id, as `input_items` lists them: an item a chain carries is held by each response of it
INPUTS = ("CREATE TABLE IF NOT EXISTS input_items (id TEXT NOT NULL, response TEXT NOT NULL, item TEXT NOT NULL, "
          "PRIMARY KEY (id, response))")
# a conversation (its metadata) and its items in the order they were added (`seq`)
CONVERSATIONS = ("CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, created INTEGER NOT NULL, "
                 "metadata TEXT NOT NULL)",
                 "CREATE TABLE IF NOT EXISTS conversation_items (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                 "conversation TEXT NOT NULL, id TEXT NOT NULL, item TEXT NOT NULL)",
                 "CREATE INDEX IF NOT EXISTS conversation_items_of ON conversation_items (conversation, seq)",
                 "CREATE INDEX IF NOT EXISTS conversation_item_ids ON conversation_items (id)")


class ResponseStore:
    """Responses by id: `put`, `get`, `delete`, a streamed background response's events, and conversations with
    their items (thread-safe; the file is made on first use)."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute(SCHEMA)
            self._db.execute(EVENTS)
            self._db.execute(OUTPUTS)
            self._db.execute(INPUTS)
            for statement in CONVERSATIONS:
                self._db.execute(statement)
            self._db.commit()
        return self._db

    def put(self, response: dict, items: list[dict]) -> None:
        """Keep a response and its conversation (every item up to and including its output)."""
        with self.lock:
            db = self._conn()
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                       (response["id"], time.time(), json.dumps(response), json.dumps(items)))
            db.executemany("INSERT OR REPLACE INTO output_items VALUES (?, ?, ?)",
                           [(it["id"], response["id"], json.dumps(it)) for it in response.get("output") or []
                            if isinstance(it.get("id"), str)])
            outputs = {it.get("id") for it in response.get("output") or []}
            db.executemany("INSERT OR REPLACE INTO input_items VALUES (?, ?, ?)",
                           [(it["id"], response["id"], json.dumps(it)) for it in items
                            if isinstance(it.get("id"), str) and it["id"] not in outputs])
            db.commit()

    def put_events(self, rid: str, events: list[bytes]) -> None:
        """Keep a streamed background response's events."""
        with self.lock:
            db = self._conn()
            db.execute("INSERT OR REPLACE INTO events VALUES (?, ?)", (rid, json.dumps([e.decode() for e in events])))
            db.commit()

    def events(self, rid: str) -> list[bytes] | None:
        """A streamed background response's events, or None when none are kept."""
        with self.lock:
            row = self._conn().execute("SELECT events FROM events WHERE id = ?", (rid,)).fetchone()
        return None if row is None else [e.encode() for e in json.loads(row[0])]

    def size(self, rid: str) -> int | None:
        """Characters of a stored response's conversation items as JSON (None when no such response is stored)."""
        with self.lock:
            row = self._conn().execute("SELECT length(items) FROM responses WHERE id = ?", (rid,)).fetchone()
        return None if row is None else row[0]

    def get(self, rid: str) -> tuple[dict, list[dict]] | None:
        """`(response, conversation items)`, or None when no such response is stored."""
        with self.lock:
            row = self._conn().execute("SELECT response, items FROM responses WHERE id = ?", (rid,)).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def delete(self, rid: str) -> bool:
        """Forget a response; False when there was none."""
        with self.lock:
            db = self._conn()
            gone = db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount
            db.execute("DELETE FROM events WHERE id = ?", (rid,))
            db.execute("DELETE FROM output_items WHERE response = ?", (rid,))
            db.execute("DELETE FROM input_items WHERE response = ?", (rid,))
            db.commit()
        return gone > 0

    def item(self, iid: str) -> dict | None:
        """A stored response's item (output, or input as `input_items` lists it), or a conversation's item, by its id
        (None: neither holds it)."""
        with self.lock:
            db = self._conn()
            row = (db.execute("SELECT item FROM output_items WHERE id = ?", (iid,)).fetchone()
                   or db.execute("SELECT item FROM input_items WHERE id = ? LIMIT 1", (iid,)).fetchone()
                   or db.execute("SELECT item FROM conversation_items WHERE id = ?", (iid,)).fetchone())
        return None if row is None else json.loads(row[0])

    def put_conversation(self, conversation: dict, items: list[dict] = ()) -> None:
        """Keep a conversation (`id`, `created_at`, `metadata`), and with a new one its first items."""
        with self.lock:
            db = self._conn()
            db.execute("INSERT OR REPLACE INTO conversations VALUES (?, ?, ?)",
                       (conversation["id"], conversation["created_at"], json.dumps(conversation["metadata"])))
            db.executemany("INSERT INTO conversation_items (conversation, id, item) VALUES (?, ?, ?)",
                           [(conversation["id"], it["id"], json.dumps(it)) for it in items])
            db.commit()

    def set_metadata(self, cid: str, metadata: dict) -> bool:
        """Replace a conversation's metadata; False when there is no such conversation (deleted meanwhile too)."""
        with self.lock:
            db = self._conn()
            done = db.execute("UPDATE conversations SET metadata = ? WHERE id = ?",
                              (json.dumps(metadata), cid)).rowcount
            db.commit()
        return done > 0

    def conversation_item(self, cid: str, iid: str) -> dict | None:
        """One item of a conversation (None: it holds none by that id)."""
        with self.lock:
            row = self._conn().execute("SELECT item FROM conversation_items WHERE conversation = ? AND id = ?",
                                       (cid, iid)).fetchone()
        return None if row is None else json.loads(row[0])

    def conversation(self, cid: str) -> dict | None:
        """A conversation object, or None when there is none by that id."""
        with self.lock:
            row = self._conn().execute("SELECT created, metadata FROM conversations WHERE id = ?", (cid,)).fetchone()
        return None if row is None else {"id": cid, "object": "conversation", "created_at": row[0],
                                         "metadata": json.loads(row[1])}

    def add_items(self, cid: str, items: list[dict]) -> bool:
        """Append items to a conversation; False (nothing added) when there is no such conversation."""
        with self.lock:
            db = self._conn()
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is None:
                return False
            db.executemany("INSERT INTO conversation_items (conversation, id, item) VALUES (?, ?, ?)",
                           [(cid, it["id"], json.dumps(it)) for it in items])
            db.commit()
        return True

    def items(self, cid: str) -> list[dict]:
        """A conversation's items, oldest first."""
        with self.lock:
            rows = self._conn().execute("SELECT item FROM conversation_items WHERE conversation = ? ORDER BY seq",
                                        (cid,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def items_size(self, cid: str) -> int:
        """Characters of a conversation's items as JSON."""
        with self.lock:
            row = self._conn().execute("SELECT sum(length(item)) FROM conversation_items WHERE conversation = ?",
                                       (cid,)).fetchone()
        return row[0] or 0

    def delete_item(self, cid: str, item_id: str) -> bool:
        """Remove one item of a conversation; False when it holds none by that id."""
        with self.lock:
            db = self._conn()
            gone = db.execute("DELETE FROM conversation_items WHERE conversation = ? AND id = ?",
                              (cid, item_id)).rowcount
            db.commit()
        return gone > 0

    def delete_conversation(self, cid: str) -> bool:
        """Forget a conversation and its items; False when there was none."""
        with self.lock:
            db = self._conn()
            gone = db.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount
            db.execute("DELETE FROM conversation_items WHERE conversation = ?", (cid,))
            db.commit()
        return gone > 0

    def close(self) -> None:
        """Close the file."""
        with self.lock:
            if self._db is not None:
                self._db.close()
                self._db = None
