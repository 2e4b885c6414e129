"""ZTF-schema Avro alert packets, publishing to Kafka and the durable spool."""
import pipeline  # noqa: F401  (process hygiene before any astropy import)
