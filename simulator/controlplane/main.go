// Command kube-testenv is the Kubernetes control plane of the test suite and of
// `gpu-supervisor simulate`: one binary that runs a real embedded etcd server, the real
// kube-apiserver, kube-scheduler or kube-controller-manager, plus a helper that writes
// the certificates and keys they need.
//
//	kube-testenv etcd --data-dir D --listen-client-url http://127.0.0.1:P1 --listen-peer-url http://127.0.0.1:P2
//	kube-testenv apiserver <kube-apiserver flags>
//	kube-testenv scheduler <kube-scheduler flags>
//	kube-testenv controller-manager <kube-controller-manager flags>
//	kube-testenv certs DIR
//	kube-testenv version
//
// It is built by build.sh and started by cluster.py; nothing here is meant for
// production use (etcd runs without fsync, keys are throwaway).
//
// With KUBE_TESTENV_PARENT_PID=<pid> in the environment, the etcd and apiserver
// subcommands shut themselves down when that process is no longer their parent.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	sub, args := os.Args[1], os.Args[2:]
	switch sub {
	case "etcd", "apiserver", "kube-apiserver", "scheduler", "controller-manager":
		dieWithParent()
	}
	switch sub {
	case "etcd":
		os.Exit(runEtcd(args))
	case "apiserver", "kube-apiserver":
		cmd := apiserver.NewAPIServerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "scheduler":
		cmd := scheduler.NewSchedulerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "controller-manager":
		cmd := controllermanager.NewControllerManagerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "certs":
		os.Exit(runCerts(args))
	case "version":
		printVersions()
	case "-h", "--help", "help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "kube-testenv: unknown subcommand %q\n", sub)
		usage()
		os.Exit(2)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `usage:
  kube-testenv etcd --data-dir D --listen-client-url URL [--listen-peer-url URL] [--name N]
  kube-testenv apiserver <kube-apiserver flags>
  kube-testenv scheduler <kube-scheduler flags>
  kube-testenv controller-manager <kube-controller-manager flags>
  kube-testenv certs DIR
  kube-testenv version
`)
}

func printVersions() {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		fmt.Println("unknown")
		return
	}
	fmt.Printf("go %s\n", bi.GoVersion)
	for _, d := range bi.Deps {
		switch d.Path {
		case "k8s.io/kubernetes", "k8s.io/apiserver", "go.etcd.io/etcd/server/v3":
			v := d.Version
			if d.Replace != nil {
				v = d.Replace.Version
			}
			fmt.Printf("%s %s\n", d.Path, v)
		}
	}
}

// dieWithParent makes a server stop when the process that started it is gone, so a
// test run that is killed outright (SIGKILL, a crashed interpreter) leaves nothing
// behind. It is on when KUBE_TESTENV_PARENT_PID names the expected parent: once our
// parent is another process (we were re-parented), we send ourselves SIGTERM, which
// both servers handle as a clean shutdown, and exit hard if that takes over 30 s.
func dieWithParent() {
	v := os.Getenv("KUBE_TESTENV_PARENT_PID")
	if v == "" {
		return
	}
	want, err := strconv.Atoi(v)
	if err != nil || want <= 1 {
		return
	}
	go func() {
		for {
			if os.Getppid() != want {
				fmt.Fprintf(os.Stderr, "kube-testenv: parent process %d is gone, shutting down\n", want)
				_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
				time.Sleep(30 * time.Second)
				fmt.Fprintln(os.Stderr, "kube-testenv: shutdown took over 30 s after the parent died, exiting")
				os.Exit(1)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}()
}

// ---------------------------------------------------------------- etcd

func runEtcd(args []string) int {
	fs := flag.NewFlagSet("etcd", flag.ExitOnError)
	dataDir := fs.String("data-dir", "", "etcd data directory (required)")
	clientURL := fs.String("listen-client-url", "http://127.0.0.1:2379", "client URL to listen on (also advertised)")
	peerURL := fs.String("listen-peer-url", "http://127.0.0.1:2380", "peer URL to listen on (also advertised)")
	name := fs.String("name", "kube-testenv", "member name")
	logLevel := fs.String("log-level", "warn", "etcd log level (debug, info, warn, error)")
	fsync := fs.Bool("fsync", false, "fsync the WAL and backend (off by default: test data is throwaway)")
	readyTimeout := fs.Duration("ready-timeout", 60*time.Second, "give up if etcd is not ready within this time")
	_ = fs.Parse(args)
	if *dataDir == "" {
		fmt.Fprintln(os.Stderr, "etcd: --data-dir is required")
		return 2
	}
	cu, err := url.Parse(*clientURL)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: bad --listen-client-url: %v\n", err)
		return 2
	}
	pu, err := url.Parse(*peerURL)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: bad --listen-peer-url: %v\n", err)
		return 2
	}

	cfg := embed.NewConfig()
	cfg.Name = *name
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = *logLevel
	cfg.LogOutputs = []string{"stderr"}
	cfg.UnsafeNoFsync = !*fsync
	// A single member on loopback: short ticks make the first election
	// (and so readiness) take milliseconds instead of about a second.
	cfg.TickMs = 10
	cfg.ElectionMs = 100
	cfg.ListenMetricsUrls = nil

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: start: %v\n", err)
		return 1
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	select {
	case <-e.Server.ReadyNotify():
		fmt.Fprintf(os.Stderr, "kube-testenv etcd: ready, serving clients on %s\n", cu.String())
	case err := <-e.Err():
		fmt.Fprintf(os.Stderr, "etcd: failed before ready: %v\n", err)
		e.Close()
		return 1
	case <-time.After(*readyTimeout):
		fmt.Fprintf(os.Stderr, "etcd: not ready after %s\n", *readyTimeout)
		e.Server.Stop()
		e.Close()
		return 1
	case s := <-sigs:
		fmt.Fprintf(os.Stderr, "etcd: %s before ready, stopping\n", s)
		e.Close()
		return 0
	}

	select {
	case s := <-sigs:
		fmt.Fprintf(os.Stderr, "kube-testenv etcd: %s, shutting down\n", s)
		done := make(chan struct{})
		go func() { e.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			fmt.Fprintln(os.Stderr, "etcd: shutdown took over 10s, exiting anyway")
			return 1
		}
		fmt.Fprintln(os.Stderr, "kube-testenv etcd: stopped")
		return 0
	case err := <-e.Err():
		fmt.Fprintf(os.Stderr, "etcd: fatal: %v\n", err)
		e.Close()
		return 1
	}
}

// ---------------------------------------------------------------- certs

// runCerts writes into DIR:
//
//	ca.crt, ca.key         self-signed CA (ECDSA P-256)
//	server.crt, server.key serving cert signed by the CA for 127.0.0.1, ::1, localhost, kubernetes.default...
//	sa.key, sa.pub         service-account token signing key pair (ECDSA P-256, ES256)
//
// Existing files are overwritten.
func runCerts(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: kube-testenv certs DIR")
		return 2
	}
	dir := args[0]
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fmt.Fprintf(os.Stderr, "certs: %v\n", err)
		return 1
	}
	if err := writeCerts(dir); err != nil {
		fmt.Fprintf(os.Stderr, "certs: %v\n", err)
		return 1
	}
	return 0
}

func writeCerts(dir string) error {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "kube-testenv-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}

	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{
			"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local",
		},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return err
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}

	files := []struct {
		name  string
		block *pem.Block
		mode  os.FileMode
	}{
		{"ca.crt", &pem.Block{Type: "CERTIFICATE", Bytes: caDER}, 0o644},
		{"ca.key", ecKeyBlock(caKey), 0o600},
		{"server.crt", &pem.Block{Type: "CERTIFICATE", Bytes: srvDER}, 0o644},
		{"server.key", ecKeyBlock(srvKey), 0o600},
		{"sa.key", ecKeyBlock(saKey), 0o600},
		{"sa.pub", &pem.Block{Type: "PUBLIC KEY", Bytes: saPub}, 0o644},
	}
	for _, f := range files {
		if f.block == nil {
			return fmt.Errorf("encoding %s", f.name)
		}
		if err := os.WriteFile(filepath.Join(dir, f.name), pem.EncodeToMemory(f.block), f.mode); err != nil {
			return err
		}
	}
	return nil
}

func ecKeyBlock(k *ecdsa.PrivateKey) *pem.Block {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil
	}
	return &pem.Block{Type: "EC PRIVATE KEY", Bytes: der}
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return big.NewInt(time.Now().UnixNano())
	}
	return n
}
