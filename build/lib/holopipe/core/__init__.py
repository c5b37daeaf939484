"""The ground floor: the HOLODEC file contract (io), files never read half-written (files), devices and array
libraries (device), configuration and the regridded grid (config, grid), secrets, provenance."""
