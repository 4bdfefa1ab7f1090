"""The pure core: policies and data structures with no Kafka, no threads of their own and no clock."""
