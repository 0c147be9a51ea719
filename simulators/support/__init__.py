"""What the tests, the benchmarks and the demo stand on, apart from the simulation itself.

``broker`` starts private brokers (mosquitto tuned or stock, the embedded amqtt,
nats-server, a RabbitMQ node) on free loopback ports; ``echo`` is a plain MQTT echo
server; ``demo`` is ``splitinfer demo`` (quantize, split, broker, worker, agents,
accuracy). The top level of :mod:`simulators` keeps what simulates: fleets, links, faults,
arrivals, reports.
"""
