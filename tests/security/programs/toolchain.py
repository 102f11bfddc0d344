"""What programs do need, under the seccomp policy: threads, processes, pipes, a socket on
loopback, getaddrinfo (netlink route)."""

import concurrent.futures
import socket
import subprocess
import threading

thread = threading.Thread(target=print, args=("thread",), kwargs={"flush": True})
thread.start()
thread.join()
with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
socket.getaddrinfo("localhost", 80)
print(sum(concurrent.futures.ThreadPoolExecutor(4).map(abs, range(-3, 0))))
piped = subprocess.run(["sh", "-c", "echo piped | cat"], capture_output=True, text=True)
print(piped.stdout, end="")
