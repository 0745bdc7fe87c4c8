"""MQTT in and out: the one seam to paho, the intake of frames, the durable outbox, status and discovery."""
