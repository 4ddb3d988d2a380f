from tcpwatch.cli import main

main()
