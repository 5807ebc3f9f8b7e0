from supervisor.daemon.main import main

main()
