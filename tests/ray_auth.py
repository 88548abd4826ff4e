"""One Ray authentication setting for every cluster the tests start and every client that talks
to one, whatever the machine carries (RAY_AUTH_MODE=disabled in the shell, a ~/.ray/auth_token
an earlier local start left, RAY_AUTH_TOKEN_PATH): token mode with a token of this test session,
given in the environment (Ray's loader prefers RAY_AUTH_TOKEN to any file). Job subprocesses
inherit it, so a `ray start --head` and its `ray job submit` / JobSubmissionClient agree.

Imported by the conftests before anything imports ray (Ray reads its auth mode at import)."""

from __future__ import annotations

import os
import secrets

# The form Ray generates itself; a subprocess of the test session that imports this module again
# keeps the session's token (it names it in SESSION_TOKEN_VARIABLE, which nothing else sets).
SESSION_TOKEN_VARIABLE = "DCA_TESTS_RAY_AUTH_TOKEN"
TOKEN = os.environ.get(SESSION_TOKEN_VARIABLE) or secrets.token_hex(32)


def use_test_ray_auth(environ=os.environ) -> None:
    environ[SESSION_TOKEN_VARIABLE] = TOKEN
    environ["RAY_AUTH_MODE"] = "token"
    environ["RAY_AUTH_TOKEN"] = TOKEN
    environ.pop("RAY_AUTH_TOKEN_PATH", None)


use_test_ray_auth()
