"""Resume tokens: a scheduler's proof, to the client of a stream, that a continuation of it is that client's.

A token is an HMAC with the cluster key (every scheduler replica has it) over the request id and the exact prompt
token ids, so a continuation is only accepted for the id and the prompt it was issued for: knowing a request id
is not enough to be served its continuation, nor the KV its prompt left behind.
"""

from __future__ import annotations

from typing import Sequence

from splitwise.kv.binding import prompt_digest
from splitwise.security.keys import sign, verify

PURPOSE = "splitwise-resume-token/1"  # the cluster key signs other things too: a token is only ever a token


def resume_token(key: bytes, request_id: str, prompt_token_ids: Sequence[int]) -> str:
    return sign(key, PURPOSE, request_id, prompt_digest(prompt_token_ids))


def valid_resume_token(key: bytes, token: str, request_id: str, prompt_token_ids: Sequence[int]) -> bool:
    return bool(token) and verify(key, token, PURPOSE, request_id, prompt_digest(prompt_token_ids))
