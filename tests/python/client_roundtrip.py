"""A client generated from docs/openapi.json by openapi-python-client creates a run, waits
for it and reads its logs. Run by tests/e2e/contract.rs with the generated package on
PYTHONPATH and TASKMESH_URL / TASKMESH_API_KEY set; prints one JSON summary line."""

import json
import os
import sys
import time

from taskmesh_api_client import AuthenticatedClient
from taskmesh_api_client.api.runs import get_run, get_step_logs, list_runs, submit_run
from taskmesh_api_client.models import Problem, RunAcceptedResponse, RunView, SubmitRunRequest

client = AuthenticatedClient(base_url=os.environ["TASKMESH_URL"], token=os.environ["TASKMESH_API_KEY"])

body = SubmitRunRequest.from_dict(
    {
        "workflow": {
            "name": "python-client",
            "inputs": {"who": {"type": "string"}},
            "steps": [
                {"id": "greet", "run": 'echo "hello ${{ inputs.who }}"; echo second line'},
                {"id": "after", "needs": ["greet"], "run": "echo done"},
            ],
        },
        "inputs": {"who": "python"},
        "labels": {"client": "python"},
    }
)
accepted = submit_run.sync(client=client, body=body)
if not isinstance(accepted, RunAcceptedResponse):
    sys.exit(f"submit answered {accepted!r}")

# Read our own write: the first read waits until the read side has the submission.
run = get_run.sync(client=client, id=accepted.id, taskmesh_min_seq=str(accepted.seq))
if not isinstance(run, RunView):
    sys.exit(f"get_run answered {run!r}")
deadline = time.monotonic() + 60
while run.status in ("queued", "running"):
    if time.monotonic() > deadline:
        sys.exit(f"the run did not end: {run.status}")
    time.sleep(0.1)
    run = get_run.sync(client=client, id=accepted.id)

page = get_step_logs.sync(client=client, id=accepted.id, step="greet")
if isinstance(page, Problem) or page is None:
    sys.exit(f"logs answered {page!r}")
listed = list_runs.sync(client=client, label="client=python")
missing = get_run.sync(client=client, id="00000000-0000-7000-8000-000000000000")
print(
    json.dumps(
        {
            "id": str(accepted.id),
            "status": run.status,
            "steps": {s.id: s.status for s in run.steps},
            "lines": [entry.line for entry in page.lines],
            "listed": [str(r.id) for r in listed.items],
            "missing": missing.code if isinstance(missing, Problem) else repr(missing),
        }
    )
)
