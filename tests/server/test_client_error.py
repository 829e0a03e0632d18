"""A client's error as one line, from the forms Flower reports it in."""

from __future__ import annotations

import pytest

from server.replies import client_error

# What the simulation engine reported for a ClientApp that raised (session 11, `devft simulate` with
# federation.fault_injection=1:raise), shortened in the middle of its tracebacks
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
    "(pid=25135, ip=192.0.2.2, actor_id=482bbe08562234370756d44601000000, repr=<flwr.simulation.ray_transport."
    "ray_actor.ClientAppActor object at 0x7f3471baed90>)\n                  ^^^^^^^^^^^^^^^^^^^^^\n  File \"/work/"
    "venv/lib/python3.11/site-packages/flwr/clientapp/client_app.py\", line 161, in __call__\n    return self._"
    "registered_funcs[full_name](message, context)\n  File \"/work/main/client/app.py\", line 95, in train\n    "
    "raise InjectedFault(f\"fault injection: partition {pid} was told to raise\")\nclient.faults.InjectedFault: "
    "fault injection: partition 1 was told to raise\n\nThe above exception was the direct cause of the following "
    "exception:\n\n\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=25135, ip=192.0.2.2)\nflwr.simulation.ray_"
    "transport.ray_actor.ClientAppException: \nException ClientAppException occurred. Message: fault injection'>"
)


# A chained error (``raise ValueError(...) from err``) in the same wrapper: Python prints the cause first
CHAINED_RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=7)\n"
    "  File \"/work/main/devft/models/loading.py\", line 75, in _from_pretrained\n"
    "OSError: foo is not a local folder and is not a valid model identifier\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "  File \"/work/main/devft/models/loading.py\", line 79, in _from_pretrained\n"
    "ValueError: could not load model name='foo'\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "ray::ClientAppActor.run() (pid=7)\n"
    "flwr.simulation.ray_transport.ray_actor.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: could not load model name='foo'\n"
    "KeyError: 'a later line of the wrapper'>"
)


@pytest.mark.parametrize(("reason", "expected"), [
    (RAY_REASON, "InjectedFault: fault injection: partition 1 was told to raise"),
    (CHAINED_RAY_REASON, "ValueError: could not load model name='foo'"),  # what the client raised, not its cause
    ("<class 'FloatingPointError'>:<'training loss became nan at step 3'>",
     "FloatingPointError: training loss became nan at step 3"),  # what a SuperNode reports
    ("<class 'client.faults.InjectedFault'>:<'fault injection: partition 0 was told to raise'>",
     "InjectedFault: fault injection: partition 0 was told to raise"),
    ("\x1b[31mno reply in 30 s\x1b[0m", "no reply in 30 s"),
])
def test_a_clients_error_is_its_own_exception_in_one_line(reason, expected):
    assert client_error(reason) == expected
