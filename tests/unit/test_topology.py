from saga.transport.topology import Binding, Topology


def test_names_are_namespaced_by_prefix() -> None:
    t = Topology(prefix="acme")
    assert t.commands_exchange == "acme.commands"
    assert t.reply_queue == "acme.replies"
    assert t.start_queue == "acme.start"
    assert t.command_queue("payment") == "acme.cmd.payment"
    assert t.dead_letter_exchange == "acme.dlx"
    assert t.dead_letter_queue("acme.replies") == "acme.replies.dlq"


def test_every_queue_has_a_dead_letter_queue_and_routes_to_it() -> None:
    t = Topology(prefix="p")
    queues = {q.name: q.arguments for q in t.queues(["b", "a"])}
    main = ["p.replies", "p.start", "p.cmd.a", "p.cmd.b"]
    assert set(queues) == set(main) | {f"{q}.dlq" for q in main}
    for q in main:
        assert queues[q]["x-dead-letter-exchange"] == "p.dlx"
        assert queues[q]["x-dead-letter-routing-key"] == f"{q}.dlq"
        assert Binding(f"{q}.dlq", "p.dlx", f"{q}.dlq") in t.bindings(["a", "b"])


def test_command_queues_bound_by_participant_name() -> None:
    bindings = Topology(prefix="p").bindings(["order", "order", "payment"])
    commands = [b for b in bindings if b.exchange == "p.commands"]
    assert commands == [
        Binding("p.cmd.order", "p.commands", "order"),
        Binding("p.cmd.payment", "p.commands", "payment"),
    ]


def test_quorum_queues_by_setting() -> None:
    classic = Topology(prefix="p").queue_arguments("p.replies")
    quorum = Topology(prefix="p", quorum=True, delivery_limit=7).queue_arguments("p.replies")
    assert "x-queue-type" not in classic
    assert quorum["x-queue-type"] == "quorum"
    assert quorum["x-delivery-limit"] == 7
    assert Topology(prefix="p", quorum=True).dead_letter_arguments() == {"x-queue-type": "quorum"}
