"""Local Kafka (KRaft) and Redis for development, tests, CI and the demo: `velocity services up|down|status`."""
