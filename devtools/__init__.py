"""Development tools: test and demo brokers, the emulated aarch64 device (QEMU user mode), fleet
emulation. Nothing of the device runtime or the monitor needs them."""
