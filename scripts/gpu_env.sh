# Sourced on the GPU machine: where the unpacked libraries are.
export LD_LIBRARY_PATH="/tmp/tutti-deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
