"""The ground floor: the HOLODEC file contract (io), devices and array libraries, configuration, secrets, provenance."""
